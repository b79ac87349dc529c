// Reconnects: a dropped signaling socket is resumed (same participant, no
// rejoin, media keeps flowing), and an ICE restart over the existing
// session brings the media path back.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { useServerAndBrowser, openCall, inboundVideo, framesOver, keepsDecoding, waitFor } from './harness.mjs';

const env = useServerAndBrowser({ before, after });

const events = (p, type) => p.page.evaluate((type) => window.moselleCall.events.filter((e) => e.type === type), type);
const sid = (p) => p.page.evaluate(() => window.moselleCall.room.localParticipant.sid);

async function call(room) {
  const alice = await openCall(env.browser, env.server, { room, name: 'Alice' });
  const bob = await openCall(env.browser, env.server, { room, name: 'Bob' });
  for (const [me, other] of [[alice, 'Bob'], [bob, 'Alice']]) {
    await waitFor(`${me.name} to decode ${other}`, async () => (await inboundVideo(me, other))?.framesDecoded > 10, 20000);
  }
  return [alice, bob];
}

test('a dropped signaling socket is resumed without a rejoin', async () => {
  const [alice, bob] = await call(`resume-${Date.now()}`);
  const bobSid = await sid(bob);
  const sessions = await env.server.metric('signal_sessions_started_total');

  await bob.page.evaluate(() => window.moselleCall.room.simulateScenario('signal-reconnect'));
  await waitFor('Bob to resume', async () => (await events(bob, 'reconnected')).length > 0, 20000);

  assert.ok((await events(bob, 'signal_reconnecting')).length > 0, 'it was a signal-only reconnect');
  assert.equal((await events(bob, 'reconnecting')).length, 0, 'no full reconnect');
  assert.equal(await sid(bob), bobSid, 'same participant after the resume');
  assert.equal((await events(alice, 'left')).length, 0, 'Alice never saw Bob leave');
  assert.ok(await env.server.metric('signal_sessions_started_total') > sessions, 'a new socket was opened');
  assert.equal(await env.server.metric('participants'), 2);
  await keepsDecoding(bob, alice, 'Bob', "Alice to still decode Bob's video");
  await keepsDecoding(alice, bob, 'Alice', "Bob to still decode Alice's video");

  // Signaling works on the new socket: a mute reaches Alice.
  await bob.page.click('#mic');
  await waitFor("Alice to see Bob muted", () => alice.page.evaluate(() => document.querySelector('#tile-Bob .name')?.textContent.includes('(muted)')));
  for (const p of [alice, bob]) await p.context.close();
});

test('an ICE restart keeps the call going', async () => {
  const [alice, bob] = await call(`ice-${Date.now()}`);
  const before = await bob.page.evaluate(async () => {
    let ufrag = null;
    const pc = window.moselleCall.room.engine.pcManager.publisher.pc;
    ufrag = pc.remoteDescription?.sdp.match(/a=ice-ufrag:(\S+)/)?.[1];
    return ufrag;
  });
  await bob.page.evaluate(() => window.moselleCall.room.engine.pcManager.triggerIceRestart());
  const after = await waitFor("the server's answer with new ICE credentials", () => bob.page.evaluate(() => {
    const pc = window.moselleCall.room.engine.pcManager.publisher.pc;
    return pc.remoteDescription?.sdp.match(/a=ice-ufrag:(\S+)/)?.[1];
  }).then((u) => (u && u !== before ? u : null)));
  assert.notEqual(after, before);
  await waitFor('the restarted connection to carry media', async () => (await framesOver(alice, 'Bob', 1000)) > 5
    && (await framesOver(bob, 'Alice', 1000)) > 5, 20000);
  for (const p of [alice, bob]) await p.context.close();
});

test('a broken media path recovers: ICE moves to another path, the server follows', async () => {
  const { execFileSync } = await import('node:child_process');
  const [alice, bob] = await call(`path-${Date.now()}`);
  // Bob's end of the media path: the local port of the selected pair.
  const selectedPort = () => bob.page.evaluate(async () => {
    const pc = window.moselleCall.room.engine.pcManager.publisher.pc;
    const stats = await pc.getStats();
    let pair = null;
    stats.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId); });
    return pair ? stats.get(pair.localCandidateId).port : null;
  });
  const port = await selectedPort();
  assert.ok(port, "Bob's selected candidate pair");
  const table = `moselle_break_${process.pid}`;
  const nft = (...a) => execFileSync('nft', a, { stdio: 'pipe' });
  nft('add', 'table', 'inet', table);
  try {
    // Every datagram to or from that port is lost, and stays lost.
    nft('add', 'chain', 'inet', table, 'in', '{ type filter hook input priority 0; }');
    nft('add', 'rule', 'inet', table, 'in', 'udp', 'sport', String(port), 'drop');
    nft('add', 'rule', 'inet', table, 'in', 'udp', 'dport', String(port), 'drop');
    // Chromium's ICE finds another pair; the server (ICE-lite) accepts the
    // new address by its ICE credentials and sends media there.
    await waitFor('media to flow both ways again over another path', async () => (await framesOver(alice, 'Bob', 1000)) > 5
      && (await framesOver(bob, 'Alice', 1000)) > 5, 40000);
    const now = await selectedPort();
    assert.notEqual(now, port, 'the call moved to another path');
    console.log(`media path moved from port ${port} to ${now}`);
  } finally {
    execFileSync('nft', ['delete', 'table', 'inet', table], { stdio: 'pipe' });
  }
  for (const p of [alice, bob]) await p.context.close();
});
