// TURN over TLS from the call page in Chromium, for a network that allows
// nothing but an HTTP proxy: the client namespace may open TCP to the proxy
// (198.18.0.3:8888) and nothing else (firewall 'proxy-only' in netlab.mjs:
// UDP dropped and counted, direct TCP to the server dropped and its SYNs
// counted); the proxy (tinyproxy) CONNECTs only to 443 (coturn, TURN/TLS)
// and Moselle's HTTP port (the signaling WebSocket), and only to the
// server's address. coturn runs in the server namespace on the config we
// ship (config/coturn.conf, placeholders filled in: relay.mjs), Moselle
// hands it out through a [[turn]] entry.
//
//   * with [[turn]]: two people see each other; every selected pair's local
//     candidate is a relay reached over TLS; Moselle received the media as
//     UDP (which only the relay can send it) and none over ICE-TCP; coturn's
//     log shows one TLS session per participant, under Moselle's
//     credentials, and media both ways with Moselle;
//   * without [[turn]] (same browser, proxy and firewall): the call page
//     fails to connect, by livekit-client's own timeout (about 16 s): the
//     relay is what carried the first case.
//
// Measured with Chromium 156 (headless): despite
// --force-webrtc-ip-handling-policy=disable_non_proxied_udp it still
// gathers a host UDP candidate and sends its checks straight to the server
// (the firewall drops them: udp_dropped > 0), and a host TCP active one
// whose connections go through the proxy (CONNECT to the ICE-TCP port,
// refused by tinyproxy).
//
//   MOSELLE_BIN=target/debug/moselle tests/netlab.sh node --test tests/browser-lab/turn.test.mjs
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { openCall, inboundVideo, waitFor } from '../browser/harness.mjs';
import { lab, startLabServer, firewall, selectedPairs, describePair, PORTS } from './netlab.mjs';
import {
  TURN_PORT, workDir, startCoturn, coturnActivity, describeCoturn, startTinyproxy, proxyActivity, describeProxy,
  moselleConfigWithTurn, serverMetric, launchProxiedBrowser,
} from './relay.mjs';

const L = lab();
const env = { dir: null, coturn: null, proxy: null, browser: null, config: null };
before(async () => {
  env.dir = workDir();
  env.coturn = await startCoturn(L, env.dir);
  console.log(`coturn from config/coturn.conf (${env.coturn.conf}); changed for the test:\n  ${env.coturn.changes.join('\n  ')}`);
  env.proxy = await startTinyproxy(L, env.dir, [TURN_PORT, PORTS.http]);
  env.config = moselleConfigWithTurn(L, env.dir, env.coturn.secretFile);
  env.browser = await launchProxiedBrowser(L);
});
let failed = false; // keep the configs and logs of a failed run (their paths are in the failure)
after(async () => {
  await env.browser?.close();
  await env.proxy?.stop();
  await env.coturn?.stop();
  if (env.dir && !failed) rmSync(env.dir, { recursive: true, force: true });
});

const metrics = () => ({ udpIn: serverMetric(L, 'udp_datagrams_in_total'), tcpIn: serverMetric(L, 'tcp_frames_in_total') });

function context(fw, server, turnFrom, proxyFrom) {
  return [
    `firewall counters: ${fw.report()}`,
    `tinyproxy log (${env.proxy.logPath}):\n${env.proxy.log().slice(proxyFrom).split('\n').slice(-25).join('\n')}`,
    `coturn log (${env.coturn.logPath}):\n${env.coturn.log().slice(turnFrom).split('\n').slice(-40).join('\n')}`,
    `server log tail:\n${server.log.filter(Boolean).slice(-25).join('\n')}`,
  ].join('\n');
}

/** Alice's and Bob's call pages, loaded through the proxy, not joined yet. */
const openBoth = (server, room) => Promise.all(['Alice', 'Bob'].map((name) => openCall(env.browser, server, { room, name, autojoin: false })));

const clickJoin = (p) => p.page.click('#join button[type=submit]');

/** Resolves with 'connected' or with the page's error text, whichever comes first. */
const outcome = (p, timeoutMs) => waitFor(`${p.name} to connect or fail`, () => p.page.evaluate(() => {
  if (window.moselleCall.events.some((e) => e.type === 'connected')) return { connected: true };
  const err = document.querySelector('#error');
  return err && !err.hidden && err.textContent ? { error: err.textContent } : null;
}), timeoutMs, 50);

/** Every local ICE candidate the page's peer connections gathered, e.g.
 * `relay udp via tls 198.18.0.1`. */
const gathered = (p) => p.page.evaluate(async () => {
  const pcm = window.moselleCall.room?.engine?.pcManager; // livekit-client internals: for the report only
  const out = new Set();
  for (const t of [pcm?.publisher, pcm?.subscriber]) {
    (await t?.getStats())?.forEach((s) => {
      if (s.type === 'local-candidate') {
        out.add(`${s.candidateType} ${s.protocol}${s.relayProtocol ? ` via ${s.relayProtocol}` : ''}${s.tcpType ? ` ${s.tcpType}` : ''} ${s.address}`);
      }
    });
  }
  return [...out];
}).catch((e) => [`<cannot read: ${e.message}>`]);

test('proxy only, with [[turn]]: two people see each other through coturn over TLS', async () => {
  const server = await startLabServer(L, ['--config', env.config]);
  const fw = firewall(L, 'proxy-only');
  const turnFrom = env.coturn.log().length;
  const proxyFrom = env.proxy.log().length;
  const people = [];
  try {
    const m0 = metrics();
    const room = `turn-tls-${Date.now()}`;
    people.push(...await openBoth(server, room));
    const [alice, bob] = people;
    const t0 = Date.now();
    await Promise.all(people.map(clickJoin));
    for (const p of people) {
      const o = await outcome(p, 20000);
      assert.ok(o.connected, `${p.name} could not join: ${o.error}; console: ${p.errors.join(' | ')}`);
    }
    const joined = Date.now() - t0;
    const firstFrame = {};
    await Promise.all([[alice, 'Bob'], [bob, 'Alice']].map(async ([me, other]) => {
      await waitFor(`${me.name} to decode a frame of ${other}'s video`, async () => (await inboundVideo(me, other))?.framesDecoded > 0, 20000, 50);
      firstFrame[me.name] = Date.now() - t0;
      await waitFor(`${me.name} to keep decoding ${other}'s video`, async () => (await inboundVideo(me, other))?.framesDecoded > 30, 20000);
    }));
    const m1 = metrics();
    const lines = [`proxy-only with TURN: both connected ${joined} ms after the join clicks; join click -> first decoded remote frame: `
      + `Alice ${firstFrame.Alice} ms, Bob ${firstFrame.Bob} ms`,
      `  firewall: ${fw.report()}`,
      `  server: ${m1.udpIn - m0.udpIn} UDP datagrams in (the client can send it none: they came from the relay), ${m1.tcpIn - m0.tcpIn} ICE-TCP frames in`];
    const wrong = [];
    const sids = [];
    for (const [me, other] of [[alice, 'Bob'], [bob, 'Alice']]) {
      sids.push(await me.page.evaluate(() => window.moselleCall.room.localParticipant.sid));
      lines.push(`  ${me.name} gathered: ${(await gathered(me)).join('; ')}`);
      const pairs = await selectedPairs(me, other);
      for (const [pc, pair] of Object.entries(pairs)) {
        lines.push(`  ${me.name} ${pc}: ${describePair(pair)}, local relayProtocol ${pair?.local.relayProtocol}`);
        if (!pair || pair.local.candidateType !== 'relay' || pair.local.relayProtocol !== 'tls') wrong.push(`${me.name} ${pc}: ${describePair(pair)}`);
      }
    }
    // Sessions end (and coturn logs their usage) when the pages leave.
    for (const p of people.splice(0)) await p.context.close();
    let turn = coturnActivity('');
    await waitFor('coturn to log the usage of the ended sessions', () => {
      turn = coturnActivity(env.coturn.log().slice(turnFrom));
      return turn.allocations > 0 && turn.ended >= turn.allocations;
    }, 5000, 100).catch(() => {});
    lines.push(`  coturn: ${describeCoturn(turn)}`, `  tinyproxy: ${describeProxy(proxyActivity(env.proxy.log().slice(proxyFrom), L.serverIp))}`);
    const report = lines.join('\n');
    console.log(report);
    assert.deepEqual(wrong, [], `every selected pair's local candidate should be relay over tls\n${report}`);
    assert.ok(fw.counters().udp_dropped > 0, `Chromium should have tried UDP and been blocked\n${report}`);
    assert.ok(m1.udpIn - m0.udpIn > 0, `Moselle should have received the media as UDP from the relay\n${report}`);
    assert.equal(m1.tcpIn - m0.tcpIn, 0, `nothing should have reached Moselle over ICE-TCP\n${report}`);
    assert.deepEqual([...new Set(turn.usernames.map((u) => u.split(':')[1]))].sort(), [...sids].sort(),
      `coturn should have had one session per participant, with Moselle's credentials (<expiry>:<sid>)\n${report}`);
    assert.ok(turn.methods.every((m) => m.startsWith('TLS')), `coturn sessions should be TLS\n${report}`);
    assert.ok(turn.allocations >= 2 && turn.peer.rb > 0 && turn.peer.sb > 0,
      `coturn should have allocated relays and carried media both ways between them and Moselle\n${report}`);
  } catch (e) {
    failed = true;
    e.message = `${e.message}\n${context(fw, server, turnFrom, proxyFrom)}`;
    throw e;
  } finally {
    for (const p of people) await p.context.close();
    fw.remove();
    await server.stop();
  }
});

test('proxy only, without [[turn]]: the call page fails to connect (the relay carried the call above)', async () => {
  const server = await startLabServer(L);
  const fw = firewall(L, 'proxy-only');
  const turnFrom = env.coturn.log().length;
  const proxyFrom = env.proxy.log().length;
  const people = [];
  try {
    const m0 = metrics();
    people.push(...await openBoth(server, `no-turn-${Date.now()}`));
    const t0 = Date.now();
    await Promise.all(people.map(clickJoin));
    const results = await Promise.all(people.map(async (p) => ({ p, o: await outcome(p, 35000), ms: Date.now() - t0 })));
    const m1 = metrics();
    const turn = coturnActivity(env.coturn.log().slice(turnFrom));
    const report = [
      'proxy-only without TURN: ' + results.map(({ p, o, ms }) => `${p.name} ${o.connected ? 'CONNECTED' : 'failed'} ${ms} ms after the join click${o.error ? ` (${o.error})` : ''}`).join('; '),
      `  firewall: ${fw.report()}`,
      `  server: ${m1.udpIn - m0.udpIn} UDP datagrams in, ${m1.tcpIn - m0.tcpIn} ICE-TCP frames in`,
      `  tinyproxy: ${describeProxy(proxyActivity(env.proxy.log().slice(proxyFrom), L.serverIp))}`,
      `  coturn: ${describeCoturn(turn)}`,
    ].join('\n');
    console.log(report);
    for (const { p, o } of results) assert.ok(!o.connected, `${p.name} should not have connected without a relay\n${report}`);
    assert.equal(m1.udpIn - m0.udpIn, 0, `no media should have reached Moselle\n${report}`);
    assert.equal(m1.tcpIn - m0.tcpIn, 0, `no media should have reached Moselle\n${report}`);
    assert.equal(turn.usernames.length, 0, `nobody was given coturn, yet it had sessions\n${report}`);
  } catch (e) {
    failed = true;
    e.message = `${e.message}\n${context(fw, server, turnFrom, proxyFrom)}`;
    throw e;
  } finally {
    for (const p of people) await p.context.close();
    fw.remove();
    await server.stop();
  }
});
