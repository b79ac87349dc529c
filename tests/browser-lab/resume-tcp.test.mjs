// Resume and ICE restart over ICE-TCP: with the client's UDP blocked, a
// dropped signaling socket is resumed (same participant, media goes on) and
// an ICE restart brings the media back, on TCP both times.
//
//   MOSELLE_BIN=target/debug/moselle tests/netlab.sh node --test tests/browser-lab/resume-tcp.test.mjs
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { launchBrowser, openCall, inboundVideo, framesOver, keepsDecoding, waitFor } from '../browser/harness.mjs';
import { lab, startLabServer, firewall, selectedPairs, describePair } from './netlab.mjs';

const L = lab();
const env = { server: null, browser: null, fw: null };
before(async () => {
  env.fw = firewall(L, 'udp-blocked');
  env.server = await startLabServer(L);
  env.browser = await launchBrowser(env.server);
});
after(async () => {
  await env.browser?.close();
  await env.server?.stop();
  env.fw?.remove();
});

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

/** Every selected pair of `me` is TCP on both ends. */
async function onTcp(me, other) {
  const pairs = await selectedPairs(me, other);
  const desc = Object.entries(pairs).map(([pc, p]) => `${pc}: ${describePair(p)}`).join('; ');
  for (const p of Object.values(pairs)) {
    assert.ok(p && p.local.protocol === 'tcp' && p.remote.protocol === 'tcp', `${me.name}'s pairs should be tcp: ${desc}`);
  }
  return desc;
}

test('with UDP blocked, a dropped signaling socket is resumed and media stays on TCP', async () => {
  const [alice, bob] = await call(`resume-tcp-${Date.now()}`);
  await onTcp(bob, 'Alice');
  const bobSid = await sid(bob);
  const t0 = Date.now();
  await bob.page.evaluate(() => window.moselleCall.room.simulateScenario('signal-reconnect'));
  await waitFor('Bob to resume', async () => (await events(bob, 'reconnected')).length > 0, 20000);
  const resumedIn = Date.now() - t0;
  assert.ok((await events(bob, 'signal_reconnecting')).length > 0, 'it was a signal-only reconnect');
  assert.equal((await events(bob, 'reconnecting')).length, 0, 'no full reconnect');
  assert.equal(await sid(bob), bobSid, 'same participant after the resume');
  await keepsDecoding(bob, alice, 'Bob', "Alice to still decode Bob's video");
  await keepsDecoding(alice, bob, 'Alice', "Bob to still decode Alice's video");
  const pairs = await onTcp(bob, 'Alice');
  console.log(`resumed over TCP in ${resumedIn} ms; ${pairs}; firewall ${env.fw.report()}`);
  assert.ok(env.fw.udpDroppedToServer() > 0, `UDP should have been tried and blocked: ${env.fw.report()}`);
  for (const p of [alice, bob]) await p.context.close();
});

test('with UDP blocked, an ICE restart brings media back over TCP', async () => {
  const [alice, bob] = await call(`ice-tcp-${Date.now()}`);
  const ufrag = () => bob.page.evaluate(() => window.moselleCall.room.engine.pcManager.publisher.pc
    .remoteDescription?.sdp.match(/a=ice-ufrag:(\S+)/)?.[1]);
  const before = await ufrag();
  const acceptedBefore = await env.server.metric('tcp_accepted_total');
  const t0 = Date.now();
  await bob.page.evaluate(() => window.moselleCall.room.engine.pcManager.triggerIceRestart());
  const after = await waitFor("the server's answer with new ICE credentials", () => ufrag().then((u) => (u && u !== before ? u : null)));
  assert.notEqual(after, before);
  await waitFor('the restarted connection to carry media', async () => (await framesOver(alice, 'Bob', 1000)) > 5
    && (await framesOver(bob, 'Alice', 1000)) > 5, 20000);
  const restartedIn = Date.now() - t0;
  const pairs = await onTcp(bob, 'Alice');
  const accepted = (await env.server.metric('tcp_accepted_total')) - acceptedBefore;
  console.log(`ICE restart over TCP: media both ways ${restartedIn} ms after the restart; ${pairs}; `
    + `${accepted} new ICE-TCP connections accepted meanwhile`);
  for (const p of [alice, bob]) await p.context.close();
});
