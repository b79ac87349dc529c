// Element Call, the real app (@element-hq/element-call-embedded), embedded by
// a host page of ours as Element Web embeds it, against a real Synapse and a
// real Moselle node: Matrix users in an end-to-end-encrypted room hold a call.
// Run with tests/element-call/run.sh (inside tests/netns.sh).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  OUT, requireComponents, buildHost, startStatic, startSynapse, startMoselle, freePort, IP,
  launchBrowser, openUser, decodingOver, waitFor,
} from './lib.mjs';

const KEYS = 'io.element.call.encryption_keys';
const SESSION = { matrix_rtc_session: { wait_for_key_rotation_ms: 5000 } };
const env = { statics: null, browser: null, apps: {} };

before(async () => {
  requireComponents();
  await buildHost();
  env.statics = await startStatic(env.apps);
  env.browser = await launchBrowser();
});

after(async () => {
  await env.browser?.close().catch(() => {});
  await env.statics?.close();
});

/** A Synapse (with or without /rtc/transports pointing at Moselle) and its Moselle node. */
async function backend(t, { transports }) {
  const httpPort = await freePort(IP);
  const synapse = await startSynapse({ transportUrl: transports ? `http://${IP}:${httpPort}` : '' });
  t.after(() => synapse.stop());
  const moselle = await startMoselle(synapse, httpPort);
  t.after(() => moselle.stop());
  return { synapse, moselle };
}

/** Keep every log of a test in tests/out/element-call-logs/<tag>-*.log, for reading afterwards. */
async function saveLogs(tag, users, moselle, synapse) {
  const dir = join(OUT, 'element-call-logs');
  mkdirSync(dir, { recursive: true });
  for (const u of users) {
    writeFileSync(join(dir, `${tag}-${u.name}.log`), `${JSON.stringify(await u.host().catch((x) => String(x)), null, 1)}\n${u.log.join('\n')}\n`);
  }
  if (moselle) writeFileSync(join(dir, `${tag}-moselle.log`), moselle.log.join('\n') + '\n');
  if (synapse) writeFileSync(join(dir, `${tag}-synapse.log`), `synapse dir: ${synapse.dir}\n${synapse.log.join('')}`);
}

/** Fail with everything that helps: the host's view, the page logs, Moselle's log. */
async function explain(e, users, moselle) {
  const parts = [e.stack || e.message];
  for (const u of users) {
    parts.push(`--- ${u.name} host: ${JSON.stringify(await u.host().catch((x) => String(x)))}`);
    parts.push(`--- ${u.name} log (last 60):\n${u.log.slice(-60).join('\n')}`);
  }
  if (moselle) parts.push(`--- moselle log (last 60):\n${moselle.log.slice(-60).join('\n')}`);
  return new Error(parts.join('\n'));
}

/** Wait until `user` decodes `n` remote videos (5+ frames in a 1 s window) and hears `n` remote audios. */
async function seesAndHears(user, n, what, timeoutMs = 45000) {
  let last;
  try {
    return await waitFor(what, async () => {
      last = await decodingOver(user, 1000);
      const fluent = last.video.filter((v) => v.delta >= 5 && v.width > 0).length;
      return fluent >= n && last.hearingAudios >= n ? last : null;
    }, timeoutMs, 0);
  } catch (e) {
    throw new Error(`${e.message}; last window: ${JSON.stringify(last)}`);
  }
}

/** When (epoch ms) `user` had decoded frames of `n` remote videos (polled every 100 ms). */
async function firstFrame(user, n = 1, timeoutMs = 60000) {
  await waitFor(`${user.name} to decode frames of ${n} remote video(s)`, async () => {
    const s = await user.inbound();
    return s && s.video.filter((v) => v.framesDecoded > 0 && v.width > 0).length >= n;
  }, timeoutMs, 100);
  return Date.now();
}

/** When (epoch ms) `user`'s host received the first media key from each peer. */
const keysFrom = (h) => Object.fromEntries(h.keysLog.filter((k) => k.dir === 'received').reverse().map((k) => [k.peer.split(':')[0], k.at]));

/** "join" to first decoded remote frame, for the log: from the widget's load and from io.element.join. */
function timing(name, times, frameAt, peerJoinedAt) {
  const fromLoad = frameAt - times.widgetCreated;
  const fromJoin = frameAt - times.joined;
  const fromBoth = frameAt - Math.max(times.joined, peerJoinedAt || 0);
  console.log(`timing ${name}: first decoded remote frame ${fromLoad} ms after the widget was loaded, `
    + `${fromJoin} ms after it joined (io.element.join)`
    + (peerJoinedAt ? `, ${fromBoth} ms after both were in the call` : ''));
}

function e2eeSummary(name, h, win) {
  console.log(`e2ee ${name}: media keys sent ${JSON.stringify(h.toDeviceSent[KEYS] || {})}, `
    + `received ${JSON.stringify(h.toDeviceReceived[KEYS] || {})}; frame transforms ${JSON.stringify(win.e2ee)}`);
  assert.ok(h.toDeviceSent[KEYS]?.encrypted > 0 && h.toDeviceSent[KEYS]?.devices > 0, `${name} sent its media key, Olm-encrypted, over Matrix`);
  assert.equal(h.toDeviceSent[KEYS]?.clear, undefined, `${name} sent no media key in clear`);
  assert.equal(h.toDeviceSent[KEYS]?.unknownDevices, undefined, `${name}'s crypto knew every device it had to send a key to`);
  assert.ok(h.toDeviceReceived[KEYS]?.encrypted > 0, `${name} received media keys, Olm-encrypted`);
  assert.equal(h.toDeviceReceived[KEYS]?.clear, undefined, `${name} received no media key in clear`);
  assert.ok(win.e2ee && win.e2ee.senders > 0 && win.e2ee.receivers > 0,
    `${name}'s app runs every sent and received frame through its E2EE transform: ${JSON.stringify(win.e2ee)}`);
}

/** Alice starts the call, Bob joins; both see and hear each other with per-participant E2EE. */
async function twoUsersCall(app, synapse, users) {
  const alice = await openUser(env.browser, { statics: env.statics, app, synapse, name: 'alice', intent: 'start_call' });
  users.push(alice);
  await waitFor('Alice to join the call', async () => (await alice.host()).times.joined !== undefined, 60000);
  const bob = await openUser(env.browser, { statics: env.statics, app, synapse, name: 'bob', intent: 'join_existing' });
  users.push(bob);

  const [aFrame, bFrame] = await Promise.all([firstFrame(alice), firstFrame(bob)]);
  const [a0, b0] = [await alice.host(), await bob.host()];
  timing('Alice (started the call)', a0.times, aFrame, b0.times.joined);
  timing('Bob (joined the running call)', b0.times, bFrame);
  console.log(`timing keys: Alice got Bob's media key ${keysFrom(a0)['@bob'] - b0.times.joined} ms and Bob got Alice's ${keysFrom(b0)['@alice'] - b0.times.joined} ms after Bob joined`);

  const aWin = await seesAndHears(alice, 1, 'Alice to see and hear Bob');
  const bWin = await seesAndHears(bob, 1, 'Bob to see and hear Alice');
  for (const [name, w] of [['Alice', aWin], ['Bob', bWin]]) {
    console.log(`${name} receives: video ${JSON.stringify(w.video.map(({ width, height, delta, framesDecoded }) => ({ width, height, fps: delta, framesDecoded })))}, `
      + `audio ${JSON.stringify(w.audio.map(({ dPackets, dEnergy }) => ({ packetsPerS: dPackets, energyPerS: +dEnergy.toFixed(4) })))}`);
  }
  e2eeSummary('Alice', await alice.host(), aWin);
  e2eeSummary('Bob', await bob.host(), bWin);
  return { alice, bob };
}

/** Which SFU the app found, from its own log line. */
function discovered(user) {
  const line = user.log.find((l) => /Found (backend|app config) transport/.test(l));
  return line ? line.replace(/^.*Found /, 'Found ') : null;
}

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
