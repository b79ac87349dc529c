// Element Call, the real app (@element-hq/element-call-embedded), embedded by
// a host page of ours as Element Web embeds it, against a real Synapse and a
// real Moselle node: Matrix users in an end-to-end-encrypted room hold a call.
// Run with tests/element-call/run.sh (inside tests/netns.sh).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { OUT, openUser, decodingOver, waitFor } from './lib.mjs';
import {
  SESSION, env, setup, backend, saveLogs, explain, seesAndHears, firstFrame, keysFrom, timing, e2eeSummary,
  twoUsersCall, discovered,
} from './calls.mjs';

setup();

test('Element Call through Moselle, found via the homeserver\'s /rtc/transports: two users, a third joins, one hangs up', async (t) => {
  const { synapse, moselle } = await backend(t, { transports: true });
  env.apps['ec-hs'] = { ...SESSION }; // no SFU in the app's own config
  const users = [];
  try {
    const { alice, bob } = await twoUsersCall('ec-hs', synapse, users);
    const a = await alice.host();
    assert.ok(a.transportsAsked > 0, 'the app asked the host for the homeserver\'s RTC transports');
    assert.deepEqual(a.transports, [{ type: 'livekit', livekit_service_url: moselle.base }]);
    assert.match(discovered(alice) || '', /Found backend transport/, `discovery: ${discovered(alice)}`);
    console.log(`discovery: ${discovered(alice)}`);
    await alice.page.screenshot({ path: join(OUT, 'element-call-2.png') });

    const members2 = await synapse.callMembers();
    assert.equal(members2.filter((m) => m.active).length, 2, `two call memberships: ${JSON.stringify(members2)}`);

    // Carol joins the running call and sees and hears both; they see and hear her.
    const kf0 = { passed: await moselle.metric('keyframe_requests_total'), held: await moselle.metric('keyframe_requests_ignored_total') };
    const carol = await openUser(env.browser, { statics: env.statics, app: 'ec-hs', synapse, name: 'carol', intent: 'join_existing' });
    users.push(carol);
    const cFrame = await firstFrame(carol);
    const cBoth = await firstFrame(carol, 2);
    const c0 = await carol.host();
    timing('Carol (third, joined the running call)', c0.times, cFrame);
    const cWin = await seesAndHears(carol, 2, 'Carol to see and hear Alice and Bob');
    const kf1 = { passed: await moselle.metric('keyframe_requests_total'), held: await moselle.metric('keyframe_requests_ignored_total') };
    const keys = keysFrom(c0);
    console.log(`timing Carol: media keys from Alice ${keys['@alice'] - c0.times.widgetCreated} ms and Bob ${keys['@bob'] - c0.times.widgetCreated} ms after load; `
      + `first remote frame ${cFrame - c0.times.widgetCreated} ms, both ${cBoth - c0.times.widgetCreated} ms after load; `
      + `keyframe requests while she joined: ${kf1.passed - kf0.passed} passed to publishers, ${kf1.held - kf0.held} held back by Moselle; `
      + `her receivers: ${JSON.stringify(cWin.video.map(({ pli, fir, keyFramesDecoded, framesReceived, framesDecoded }) => ({ pli, fir, keyFramesDecoded, framesReceived, framesDecoded })))}`);
    await seesAndHears(alice, 2, 'Alice to see and hear Bob and Carol');
    await seesAndHears(bob, 2, 'Bob to see and hear Alice and Carol');
    e2eeSummary('Carol', await carol.host(), cWin);
    await carol.page.screenshot({ path: join(OUT, 'element-call-3.png') });

    const members3 = await synapse.callMembers();
    console.log(`call.member state with three: ${JSON.stringify(members3.map((m) => [m.stateKey, m.active]))}`);
    assert.equal(members3.filter((m) => m.active).length, 3, 'three active call memberships');

    // Carol clicks the app's hang-up button; the app tells the host, and the others see her go.
    const hungUpAt = Date.now();
    await carol.frame().click('[data-testid="incall_leave"]');
    // The app asks its host to close it (io.element.close) after hanging up.
    const ct = await waitFor('Carol\'s app to hang up and ask to be closed', async () => {
      const { times } = await carol.host();
      return times.closed !== undefined ? times : null;
    }, 15000);
    console.log(`Carol's app: ${ct.hungUp ? `im.vector.hangup after ${ct.hungUp - hungUpAt} ms, ` : ''}io.element.close after ${ct.closed - hungUpAt} ms`);
    const [wa, wb] = await waitFor('Alice and Bob to stop receiving Carol', async () => {
      const w = await Promise.all([decodingOver(alice, 1000), decodingOver(bob, 1000)]);
      return w.every((x) => x.decodingVideos === 1) ? w : null;
    }, 30000, 0);
    console.log(`after Carol hung up (${Date.now() - hungUpAt} ms): Alice decodes ${wa.decodingVideos} video(s), Bob ${wb.decodingVideos}`);
    const after = await waitFor('Carol\'s call membership to end in the room state', async () => {
      const m = await synapse.callMembers();
      const carolActive = m.some((x) => x.active && x.sender === synapse.users.carol.user_id);
      return !carolActive && m.filter((x) => x.active).length === 2 ? m : null;
    }, 30000);
    console.log(`call.member state after Carol left: ${JSON.stringify(after.map((m) => [m.stateKey, m.active]))}`);
    await waitFor('Alice\'s app to show two tiles', async () => {
      const s = await alice.inbound();
      return s.tiles.length === 2 ? s.tiles : null;
    }, 15000);
    await seesAndHears(alice, 1, 'Alice to keep seeing and hearing Bob');
    await seesAndHears(bob, 1, 'Bob to keep seeing and hearing Alice');
  } catch (e) {
    throw await explain(e, users, moselle);
  } finally {
    await saveLogs('hs', users, moselle, synapse);
    for (const u of users) await u.close();
  }
});

test('Element Call through Moselle, found via the app\'s config.json livekit_service_url (homeserver lists no transports)', async (t) => {
  const { synapse, moselle } = await backend(t, { transports: false });
  env.apps['ec-cfg'] = { ...SESSION, livekit: { livekit_service_url: moselle.base } };
  const users = [];
  try {
    const { alice } = await twoUsersCall('ec-cfg', synapse, users);
    const a = await alice.host();
    assert.deepEqual(a.transports || [], [], 'the homeserver lists no RTC transports');
    assert.match(discovered(alice) || '', /Found app config transport/, `discovery: ${discovered(alice)}`);
    console.log(`discovery: ${discovered(alice)}`);
  } catch (e) {
    throw await explain(e, users, moselle);
  } finally {
    await saveLogs('cfg', users, moselle, synapse);
    for (const u of users) await u.close();
  }
});
