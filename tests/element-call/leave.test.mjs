// A killed browser: Alice and Bob are in an Element Call call through
// Moselle, Bob's app delegated its delayed leave event to Moselle (as it does
// with lk-jwt-service), then Bob's Chromium is killed with SIGKILL (the whole
// process tree, no goodbye). His call membership must end for Alice within
// Moselle's resume window plus a margin, ended by Moselle's delegated leave
// (the app's own delayed leave would wait an hour).
// Run with tests/element-call/run.sh (inside tests/netns.sh).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { launchBrowser, sleep, waitFor } from './lib.mjs';
import { SESSION, env, setup, backend, saveLogs, explain, twoUsersCall, killBobAndWatch } from './calls.mjs';

setup();

test('Element Call: a participant whose browser is killed (kill -9) leaves the call through Moselle\'s delegated leave', async (t) => {
  const { synapse, moselle } = await backend(t, { transports: true });
  env.apps['ec-leave'] = { ...SESSION };
  // Bob in a browser of his own, so that killing it leaves Alice's alone.
  const bobBrowser = await launchBrowser();
  t.after(() => bobBrowser.close().catch(() => {}));
  const users = [];
  try {
    const { alice, bob } = await twoUsersCall('ec-leave', synapse, users, { bobBrowser });
    const bobId = synapse.users.bob.user_id;

    // The app found that Moselle delegates (its probe of /delegate_delayed_leave
    // was not a 404) and asked for a token again with its delayed leave's id.
    const delegation = await waitFor('Bob\'s app to delegate its delayed leave to Moselle', async () => {
      const c = bob.tokenCalls.find((x) => x.url === `${moselle.base}/sfu/get` && x.delegated && x.status === 200);
      return c && (await moselle.metric('matrix_delegations_accepted_total')) >= 2 ? c : null;
    }, 30000);
    const probe = bob.tokenCalls.find((x) => x.url === `${moselle.base}/delegate_delayed_leave`);
    assert.ok(probe && probe.status !== 404, `Bob's app probed Moselle's delegate_delayed_leave: ${JSON.stringify(probe)}`);
    assert.ok(bob.log.some((l) => /supports delegation/.test(l)), 'Bob\'s app logged that the transport supports delegation');
    assert.equal(delegation.delay_cs_api_url, synapse.base_url);
    const bobIdentity = delegation.sub;
    assert.equal(bobIdentity, `${bobId}:${synapse.users.bob.device_id}`);
    console.log(`delegation: Bob's app probed /delegate_delayed_leave (${probe.status}), then POST /sfu/get with delay_id, `
      + `delay_timeout ${delegation.delay_timeout} ms, delay_cs_api_url ${delegation.delay_cs_api_url}; `
      + `Moselle accepted ${await moselle.metric('matrix_delegations_accepted_total')} delegation(s)`);
    assert.ok(delegation.delay_timeout >= 600000, `the app's own delayed leave is long (${delegation.delay_timeout} ms): only a delegated leave can end the membership soon`);

    await killBobAndWatch({ label: 'compatibility mode', alice, bob, bobBrowser, bobIdentity, moselle, synapse, roomState: true });

    // Alice stays in the call, alone.
    const after = await synapse.callMembers();
    console.log(`call.member state after the kill: ${JSON.stringify(after.map((m) => [m.stateKey, m.active]))}`);
    assert.deepEqual(after.filter((m) => m.active).map((m) => m.sender), [synapse.users.alice.user_id], 'only Alice is still in the call');
  } catch (e) {
    throw await explain(e, users, moselle);
  } finally {
    await saveLogs('leave', users, moselle, synapse);
    for (const u of users) await Promise.race([u.close(), sleep(3000)]);
  }
});
