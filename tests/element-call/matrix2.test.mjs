// Element Call in matrix_2_0 mode (config.json `matrix_rtc_mode`): call
// memberships are MSC4354 sticky `org.matrix.msc4143.rtc.member` room events
// (Synapse with msc4354_enabled; our host passes them through the widget API's
// MSC4407 sticky-event actions), tokens come from Moselle's `/get_token`, and
// LiveKit identities are hashed (unpadded base64 of SHA-256 over
// [user, device, member id]). Two users see and hear each other with
// per-participant keys exchanged over Olm to-device, as in compatibility mode.
// Then Bob's browser is killed (kill -9): his delayed sticky leave, delegated
// to Moselle through /get_token, ends his membership for Alice.
// Run with tests/element-call/run.sh (inside tests/netns.sh).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { OUT, launchBrowser, sleep } from './lib.mjs';
import { SESSION, env, setup, backend, saveLogs, explain, twoUsersCall, discovered, killBobAndWatch } from './calls.mjs';

setup();

const RTC_MEMBER = 'org.matrix.msc4143.rtc.member';
const hashedIdentity = (user, device, memberId) => createHash('sha256')
  .update(JSON.stringify([user, device, memberId])).digest('base64').replace(/=+$/, '');

test('Element Call in matrix_2_0 mode through Moselle: /get_token, hashed identities, sticky membership events, a killed browser', async (t) => {
  const { synapse, moselle } = await backend(t, { transports: true, sticky: true });
  env.apps['ec-m2'] = { ...SESSION, matrix_rtc_mode: 'matrix_2_0' };
  // Bob in a browser of his own, to be killed at the end.
  const bobBrowser = await launchBrowser();
  t.after(() => bobBrowser.close().catch(() => {}));
  const users = [];
  try {
    const versions = await (await fetch(`${synapse.base_url}/_matrix/client/versions`)).json();
    assert.equal(versions.unstable_features?.['org.matrix.msc4354'], true, 'Synapse advertises sticky events (org.matrix.msc4354)');

    const { alice, bob } = await twoUsersCall('ec-m2', synapse, users, { bobOnlineFirst: true, bobBrowser });
    assert.match(discovered(alice) || '', /Found backend transport/, `discovery: ${discovered(alice)}`);
    await alice.page.screenshot({ path: join(OUT, 'element-call-matrix2.png') });

    const identities = {};
    for (const u of [alice, bob]) {
      const calls = u.tokenCalls.filter((c) => c.url.startsWith(moselle.base));
      const tokens = calls.filter((c) => c.endpoint === 'get_token');
      console.log(`${u.name}'s token service calls: ${JSON.stringify(calls.map((c) => [c.endpoint, c.status, c.delegated ? 'delay_id' : '', c.sub || '']))}`);
      assert.ok(tokens.length > 0 && tokens.every((c) => c.status === 200), `${u.name} got tokens from /get_token: ${JSON.stringify(tokens)}`);
      assert.equal(calls.filter((c) => c.endpoint === 'sfu/get').length, 0, `${u.name} never called the legacy /sfu/get`);
      for (const c of tokens) {
        assert.equal(c.member.claimed_user_id, u.userId);
        assert.equal(c.member.claimed_device_id, u.deviceId);
        assert.match(c.sub, /^[A-Za-z0-9+/]{43}$/, `${u.name}'s LiveKit identity is 43 characters of base64: ${c.sub}`);
        assert.equal(c.sub, hashedIdentity(u.userId, u.deviceId, c.member.id), `${u.name}'s identity is the hash of [user, device, member id]`);
      }
      identities[u.name] = tokens[tokens.length - 1].sub;
      const delegated = tokens.filter((c) => c.delegated);
      console.log(`${u.name}: LiveKit identity ${identities[u.name]} (member id ${tokens[0].member.id}); `
        + `delayed leave delegated through /get_token: ${delegated.length ? `yes (delay_timeout ${delegated[0].delay_timeout} ms, answer ${delegated[0].status})` : 'no'}`);
    }
    // Each LiveKit client knows the other by the hashed identity (JOINED or
    // ACTIVE: Moselle does not announce the change to ACTIVE on its own).
    const [aLk, bLk] = [await alice.lk(), await bob.lk()];
    for (const [who, lk, peer, id] of [['Alice', aLk, 'Bob', identities.bob], ['Bob', bLk, 'Alice', identities.alice]]) {
      const p = lk.participants[id];
      assert.ok(p && p.disconnectedAt === undefined && Object.values(p.sids).some((st) => st === 1 || st === 2),
        `${who}'s LiveKit client has ${peer} (${id}) in the room: ${JSON.stringify(lk)}`);
      console.log(`${who}'s LiveKit client: ${peer} as ${id}, participant states ${JSON.stringify(p.sids)} (1 JOINED, 2 ACTIVE, 3 DISCONNECTED)`);
    }

    // Memberships went out as sticky rtc.member events, and each host passed the other's to its app.
    const [a, b] = [await alice.host(), await bob.host()];
    for (const [name, h, peer] of [['Alice', a, synapse.users.bob.user_id], ['Bob', b, synapse.users.alice.user_id]]) {
      const sticky = h.sent.filter((s) => s.type === RTC_MEMBER && s.sticky);
      console.log(`${name} sent: ${JSON.stringify(h.sent.map((s) => [s.type, s.stateKey ?? null, s.sticky ?? null, s.delayed ?? null]))}; `
        + `delayed events: ${JSON.stringify(h.delayed)}; sticky events read for the app: ${h.stickyRead}`);
      assert.ok(sticky.some((s) => !s.delayed), `${name}'s app published its membership as a sticky ${RTC_MEMBER} event`);
      assert.ok(h.memberLog.some((m) => m.type === RTC_MEMBER && m.kind === 'sticky' && m.sender === peer && m.active),
        `${name}'s host received the peer's sticky membership: ${JSON.stringify(h.memberLog)}`);
    }
    for (const [name, h] of [['Alice', a], ['Bob', b]]) {
      assert.deepEqual(h.undecryptable, [], `${name}'s host decrypted every room event it passed on`);
    }
    console.log(`Moselle: ${await moselle.metric('matrix_delegations_accepted_total')} delayed leave(s) delegated through /get_token`);
    const state = await synapse.callMembers();
    console.log(`call.member state events in matrix_2_0 mode: ${JSON.stringify(state.map((m) => [m.stateKey, m.active]))}`);

    // Bob's delayed sticky leave was delegated to Moselle (/get_token with delay_id); kill -9 his browser.
    assert.ok(bob.tokenCalls.some((c) => c.endpoint === 'get_token' && c.delegated && c.status === 200),
      'Bob\'s app delegated its delayed leave to Moselle through /get_token');
    await killBobAndWatch({ label: 'matrix_2_0 mode', alice, bob, bobBrowser, bobIdentity: identities.bob, moselle, synapse, roomState: false });
  } catch (e) {
    throw await explain(e, users, moselle);
  } finally {
    await saveLogs('matrix2', users, moselle, synapse);
    for (const u of users) await Promise.race([u.close(), sleep(3000)]);
  }
});
