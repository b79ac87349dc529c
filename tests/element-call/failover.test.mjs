// A node dies mid-call: two LU nodes share Redis, each announces a URL that
// fails over to the other (a provider's load balancer or floating address;
// here a TCP front per node). Alice and Bob are in an Element Call call; the
// node holding it is killed with SIGKILL (no drain, no goodbye). Element
// Call 0.26.1 never asks for a new token, so the call can come back only
// through livekit-client's own reconnect to the same URL: the survivor
// answers the resume with "join afresh", refuses the join (409, retried)
// while the dead node still counts as alive, then re-places the call in LU
// and both see and hear each other again, their memberships untouched.
// Run with tests/element-call/run.sh (inside tests/netns.sh).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { IP, OUT, freePort, startRedis, startFailoverFront, startSynapse, startMoselle, sleep, waitFor } from './lib.mjs';
import { SESSION, env, setup, saveLogs, explain, twoUsersCall, seesAndHears } from './calls.mjs';

setup();

/** Total frames `user` has decoded of remote videos. */
const frames = async (user) => (await user.inbound()).video.reduce((n, v) => n + v.framesDecoded, 0);

test('Element Call: the node holding the call is killed (kill -9); the call comes back on the other LU node by itself', async (t) => {
  const redis = await startRedis();
  t.after(() => redis.stop());
  const ports = { 'lu-1': await freePort(IP), 'lu-2': await freePort(IP) };
  const fronts = {
    'lu-1': await startFailoverFront([ports['lu-1'], ports['lu-2']]),
    'lu-2': await startFailoverFront([ports['lu-2'], ports['lu-1']]),
  };
  t.after(() => Promise.all(Object.values(fronts).map((f) => f.close())));
  const synapse = await startSynapse({ transportUrl: `http://${IP}:${fronts['lu-1'].port}` });
  t.after(() => synapse.stop());
  const nodes = {};
  for (const id of ['lu-1', 'lu-2']) {
    nodes[id] = await startMoselle(synapse, ports[id], { nodeId: id, redisUrl: redis.url, publicUrl: `ws://${IP}:${fronts[id].port}` });
    t.after(() => nodes[id].stop());
  }
  await sleep(1500); // both nodes registered (heartbeat 1 s)
  env.apps['ec-failover'] = { ...SESSION };
  const users = [];
  let held = null;
  try {
    const { alice, bob } = await twoUsersCall('ec-failover', synapse, users);
    const count = async (id) => nodes[id].metric('participants').catch(() => 0);
    held = (await count('lu-1')) === 2 ? 'lu-1' : 'lu-2';
    const other = held === 'lu-1' ? 'lu-2' : 'lu-1';
    assert.equal(await count(held), 2, `the call is on ${held}`);
    assert.equal(await count(other), 0, `nobody is on ${other}`);
    const state0 = await synapse.callMembers();
    assert.equal(state0.filter((m) => m.active).length, 2, 'two call memberships before the kill');

    const tKill = Date.now();
    nodes[held].proc.kill('SIGKILL');
    const byNode = (f) => Object.fromEntries(Object.entries(ports).map(([id, port]) => [id, f.taken[port]]));
    const before = byNode(fronts[held]);
    console.log(`failover: killed ${held}, which held the call (connections through its URL so far, by node: ${JSON.stringify(before)}); ${other} survives`);

    // Decoding stops, then comes back on both sides.
    const seen = {};
    const last = { alice: await frames(alice), bob: await frames(bob) };
    // On a timeout, where the video stops: packets and frames received
    // (the SFU forwards) against frames decoded (keyframes, E2EE), per side.
    const whereStuck = async () => JSON.stringify(Object.fromEntries(await Promise.all([['alice', alice], ['bob', bob]].map(async ([name, u]) => {
      const s = await u.inbound().catch(() => null);
      const pick = ({ packets, bytes, framesReceived, framesDecoded, keyFramesDecoded, pli, fir, width }) => ({ packets, bytes, framesReceived, framesDecoded, keyFramesDecoded, pli, fir, width });
      return [name, s && { video: s.video.map(pick), audio: s.audio.map(({ packets, energy }) => ({ packets, energy })), receivers: s.receivers, e2ee: s.e2ee }];
    }))));
    await waitFor('both to decode each other\'s video again after the kill', async () => {
      for (const [name, u] of [['alice', alice], ['bob', bob]]) {
        const f = await frames(u).catch(() => 0);
        if (seen[`${name}Stopped`] === undefined && f === last[name] && Date.now() - tKill > 500) seen[`${name}Stopped`] = Date.now();
        if (seen[`${name}Stopped`] !== undefined && seen[`${name}Back`] === undefined && f > last[name]) seen[`${name}Back`] = Date.now();
        last[name] = f;
      }
      return seen.aliceBack !== undefined && seen.bobBack !== undefined;
    }, 90000, 200).catch(async (e) => {
      const a = await whereStuck();
      await sleep(2000);
      throw new Error(`${e.message}; inbound now ${a}, 2 s later ${await whereStuck()}; seen ${JSON.stringify(seen)}`);
    });
    const aWin = await seesAndHears(alice, 1, 'Alice to see and hear Bob again, on the surviving node');
    const bWin = await seesAndHears(bob, 1, 'Bob to see and hear Alice again, on the surviving node');
    const fluentAt = Date.now();
    await alice.page.screenshot({ path: join(OUT, 'element-call-failover.png') });

    assert.equal(await count(other), 2, `both are on ${other} now`);
    const revived = nodes[other].log.find((l) => l.includes('placing the call again'));
    const refusals = nodes[other].log.filter((l) => /wrong_node|409/.test(l)).length;
    const state1 = await synapse.callMembers();
    assert.deepEqual(state1.filter((m) => m.active).map((m) => m.sender).sort(), [synapse.users.alice.user_id, synapse.users.bob.user_id].sort(),
      'both call memberships still stand: nobody left the call');
    for (const u of [alice, bob]) {
      const h = await u.host();
      assert.equal(h.state, 'in call', `${u.name}'s app is still in the call`);
      const tokens = u.tokenCalls.filter((c) => c.at >= tKill);
      console.log(`${u.name}: token requests after the kill: ${tokens.length}; app errors: ${JSON.stringify(h.errors)}`);
    }
    const reconnects = (u) => u.log.filter((l) => /reconnect|resum/i.test(l)).slice(0, 12);
    console.log(`Alice's app/livekit-client log on reconnecting: ${JSON.stringify(reconnects(alice))}`);
    console.log(`${other}'s log: ${revived ? revived.replace(/\x1b\[[0-9;]*m/g, '') : 'no revive line'}; refusals logged: ${refusals}`);
    console.log(`timing node kill -9 (node_ttl 3 s): Alice's decoding stopped ${seen.aliceStopped - tKill} ms and came back ${seen.aliceBack - tKill} ms after the kill; `
      + `Bob's stopped ${seen.bobStopped - tKill} ms, came back ${seen.bobBack - tKill} ms; both fluent (video and audio) ${fluentAt - tKill} ms after the kill; `
      + `connections through ${held}'s URL, by node: ${JSON.stringify(byNode(fronts[held]))}`);
    assert.ok(revived, `${other} logged that it placed the call again`);
    assert.ok(byNode(fronts[held])[other] > before[other], `the clients' reconnects reached ${other} through ${held}'s URL`);
    console.log(`after the failover: Alice receives ${JSON.stringify(aWin.video.map((v) => [v.width, v.height, v.delta]))}, Bob receives ${JSON.stringify(bWin.video.map((v) => [v.width, v.height, v.delta]))}`);
  } catch (e) {
    throw await explain(e, users, held ? nodes[held === 'lu-1' ? 'lu-2' : 'lu-1'] : nodes['lu-1']);
  } finally {
    await saveLogs('failover', users, null, synapse);
    for (const id of Object.keys(nodes)) await import('node:fs').then((fs) => fs.writeFileSync(join(OUT, 'element-call-logs', `failover-${id}.log`), nodes[id].log.join('\n') + '\n'));
    for (const u of users) await Promise.race([u.close(), sleep(3000)]);
  }
});
