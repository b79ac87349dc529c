// Connectivity from the call page in Chromium: with UDP blocked (by the
// client's own firewall, or silently on the path) the call still works (ICE
// over TCP to the server), and where UDP is allowed it stays on UDP. Runs in tests/netlab.sh's lab: node
// and Chromium in the client namespace (198.18.0.2), the server in the
// server namespace (198.18.0.1), nftables on the client's output.
//
//   MOSELLE_BIN=target/debug/moselle tests/netlab.sh node --test tests/browser-lab/
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { launchBrowser, openCall, inboundVideo, waitFor } from '../browser/harness.mjs';
import { lab, startLabServer, firewall, selectedPairs, describePair } from './netlab.mjs';

const L = lab();
const env = { server: null, browser: null };
before(async () => {
  env.server = await startLabServer(L);
  env.browser = await launchBrowser(env.server);
});
after(async () => {
  await env.browser?.close();
  await env.server?.stop();
});

const context = (fw) => `firewall counters: ${fw.report()}\nserver log tail:\n${env.server.log.filter(Boolean).slice(-30).join('\n')}`;

/**
 * Alice and Bob join at the same moment; each must decode the other's video,
 * and every selected candidate pair must be `protocol` on both ends. Prints
 * join -> first decoded frame per participant and the pairs.
 */
async function twoPartyCall(fw, protocol) {
  const room = `${fw.kind}-${Date.now()}`;
  const people = [];
  const tcpIn0 = await env.server.metric('tcp_frames_in_total');
  const t0 = Date.now();
  try {
    const [alice, bob] = await Promise.all(['Alice', 'Bob'].map((name) => openCall(env.browser, env.server, { room, name })));
    people.push(alice, bob);
    const joined = Date.now() - t0;
    const firstFrame = {};
    await Promise.all([[alice, 'Bob'], [bob, 'Alice']].map(async ([me, other]) => {
      await waitFor(`${me.name} to decode a frame of ${other}'s video`, async () => (await inboundVideo(me, other))?.framesDecoded > 0, 20000, 50);
      firstFrame[me.name] = Date.now() - t0;
      await waitFor(`${me.name} to keep decoding ${other}'s video`, async () => (await inboundVideo(me, other))?.framesDecoded > 30, 20000);
    }));
    const tcpIn = (await env.server.metric('tcp_frames_in_total')) - tcpIn0;
    const lines = [`${fw.kind}: both joined (openCall) in ${joined} ms; join -> first decoded remote frame: `
      + `Alice ${firstFrame.Alice} ms, Bob ${firstFrame.Bob} ms; firewall: ${fw.report()}; server: ${tcpIn} ICE-TCP frames in`];
    const wrong = [];
    for (const [me, other] of [[alice, 'Bob'], [bob, 'Alice']]) {
      const pairs = await selectedPairs(me, other);
      for (const [pc, pair] of Object.entries(pairs)) {
        lines.push(`  ${me.name} ${pc}: ${describePair(pair)}`);
        if (!pair || pair.local.protocol !== protocol || pair.remote.protocol !== protocol) wrong.push(`${me.name} ${pc}: ${describePair(pair)}`);
      }
    }
    console.log(lines.join('\n'));
    assert.deepEqual(wrong, [], `selected candidate pairs should be ${protocol} on both ends\n${lines.join('\n')}`);
    if (protocol === 'tcp') assert.ok(tcpIn > 0, `the server should have received the call over ICE-TCP\n${lines.join('\n')}`);
  } catch (e) {
    e.message = `${fw.kind}: ${e.message}\n${context(fw)}`;
    throw e;
  } finally {
    for (const p of people) await p.context.close();
  }
}

for (const kind of ['udp-blocked', 'udp-blackholed']) {
  test(`${kind}: two people on the call page see each other over ICE-TCP`, async () => {
    const fw = firewall(L, kind);
    try {
      await twoPartyCall(fw, 'tcp');
      assert.ok(fw.udpDroppedToServer() > 0, `the browsers should have tried UDP to the server and been blocked: ${fw.report()}`);
    } finally {
      fw.remove();
    }
  });
}

test('udp-allowed (control): the same call stays on UDP', async () => {
  const fw = firewall(L, 'udp-allowed');
  try {
    await twoPartyCall(fw, 'udp');
  } finally {
    fw.remove();
  }
});
