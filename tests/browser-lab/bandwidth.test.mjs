// A subscriber on a weak link: the server estimates each subscriber's
// downlink and fits its simulcast layers into it. Alice publishes 720p
// simulcast from a browser on the lab's proxy host, Carol watches from
// there on an open link; Bob watches from the client host, whose downlink
// is shaped by `tc tbf` on the hub's port towards it (v-client). At
// 600 kbit/s Bob gets a lower layer and keeps decoding; at 150 kbit/s his
// video is paused (livekit-client's stream state says so) while his audio
// goes on; without the limit the top layer returns. Carol keeps 1280x720
// throughout.
//
//   MOSELLE_BIN=target/debug/moselle tests/netlab.sh node --test tests/browser-lab/bandwidth.test.mjs
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  launchBrowser, openCall, inboundVideo, inboundAudio, outboundVideo, streamState, sizeVideoOf, keepsDecoding, waitFor, sleep,
} from '../browser/harness.mjs';
import { lab, startLabServer } from './netlab.mjs';

const L = lab();
const env = { server: null, open: null, shaped: null };
before(async () => {
  env.server = await startLabServer(L, ['--downlink-bwe']);
  env.shaped = await launchBrowser(env.server);
  env.open = await launchBrowser(env.server, { netns: L.nsProxy });
});
after(async () => {
  shape(null);
  await env.shaped?.close();
  await env.open?.close();
  await env.server?.stop();
});

/** Limit everything the hub sends to the client host to `kbit` kbit/s (null: no limit). */
function shape(kbit) {
  const tc = (...a) => execFileSync('ip', ['netns', 'exec', L.nsHub, 'tc', ...a], { stdio: ['ignore', 'pipe', 'pipe'] });
  if (kbit === null) {
    try { tc('qdisc', 'del', 'dev', 'v-client', 'root'); } catch { /* none */ }
    return;
  }
  // A queue of up to 200 ms, as a congested access link has: the delay is
  // what the estimator sees first. A small bucket (2 KB): a large one lets
  // a short probe through at line rate, which no access link does.
  tc('qdisc', 'replace', 'dev', 'v-client', 'root', 'tbf', 'rate', `${kbit}kbit`, 'burst', '2kb', 'latency', '200ms');
}

/** What `p` gets of Alice over `ms`: video frames, width, freezes, bytes; audio packets. */
async function window(p, ms = 2000) {
  const [v0, a0] = [await inboundVideo(p, 'Alice'), await inboundAudio(p, 'Alice')];
  await sleep(ms);
  const [v1, a1] = [await inboundVideo(p, 'Alice'), await inboundAudio(p, 'Alice')];
  const d = (k, x, y) => (y?.[k] || 0) - (x?.[k] || 0);
  return {
    fps: +(d('framesDecoded', v0, v1) / (ms / 1000)).toFixed(1),
    width: v1?.width || 0,
    kbps: Math.round((d('bytes', v0, v1) * 8) / ms),
    freezes: d('freezeCount', v0, v1),
    audioPps: Math.round(d('packets', a0, a1) / (ms / 1000)),
    state: await streamState(p, 'Alice'),
  };
}

/** A per-room series of /metrics (`moselle_<name>{room="<room>"}`), 0 when absent. */
async function roomMetric(name, room) {
  const text = await (await fetch(`${env.server.base}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`moselle_${name}{room="${room}"} `));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** Bob's own connection quality as the server last rated it. */
const ownQuality = (p) => p.page.evaluate(() => {
  const q = window.moselleCall.events.filter((e) => e.type === 'quality' && e.who === 'Bob');
  return q.length ? q[q.length - 1].quality : null;
});

test('a subscriber\'s downlink estimate drives its layers: lower at 600 kbit/s, paused at 150 kbit/s (audio goes on), back to the top when the limit goes', async () => {
  shape(null);
  const room = `bandwidth-${Date.now()}`;
  const people = [];
  const log = [];
  const note = (line) => { log.push(line); console.log(line); };
  try {
    const alice = await openCall(env.open, env.server, { room, name: 'Alice' });
    const carol = await openCall(env.open, env.server, { room, name: 'Carol', query: { media: '0' } });
    const bob = await openCall(env.shaped, env.server, { room, name: 'Bob', query: { media: '0' } });
    people.push(alice, carol, bob);
    for (const p of [bob, carol]) await sizeVideoOf(p, 'Alice', 1280, 720);

    // Open links: both get the top layer.
    for (const p of [bob, carol]) {
      await waitFor(`${p.name} to receive Alice's top layer (1280 wide)`, async () => (await inboundVideo(p, 'Alice'))?.width === 1280, 45000, 500)
        .catch(async (e) => {
          throw new Error(`${e.message}; ${p.name} gets ${JSON.stringify(await window(p))}; Alice sends ${JSON.stringify(await outboundVideo(alice))}`);
        });
    }
    // ... and hold it over a whole window: on a busy host a client's own
    // receive path can drop packets at the start, which the server cannot
    // tell from a full link (it reacts, then raises again).
    let wStart = null;
    await waitFor('Bob to hold the top layer on the open link', async () => (wStart = await window(bob)).width === 1280 && wStart.fps >= 10, 60000, 0)
      .catch((e) => { throw new Error(`${e.message}; Bob gets ${JSON.stringify(wStart)}`); });
    note(`open link: Bob ${JSON.stringify(wStart)}, Carol ${JSON.stringify(await window(carol))}`);
    const freezes0 = (await inboundVideo(bob, 'Alice')).freezeCount;
    const [down0, pauses0] = [await env.server.metric('bandwidth_downgrades_total'), await env.server.metric('bandwidth_pauses_total')];

    // 600 kbit/s: a lower layer within seconds, still decoding, audio on.
    shape(600);
    let t = Date.now();
    await waitFor('Bob to receive a lower layer at 600 kbit/s', async () => {
      const v = await inboundVideo(bob, 'Alice');
      return v && v.width > 0 && v.width < 1280;
    }, 30000, 250);
    const stepDown = Date.now() - t;
    await keepsDecoding(alice, bob, 'Alice', 'Bob to keep decoding Alice at 600 kbit/s', { min: 10, ms: 2000, timeoutMs: 20000 });
    const w600 = await window(bob, 3000);
    const c600 = await window(carol);
    note(`600 kbit/s: Bob stepped down ${stepDown} ms after the limit; then ${JSON.stringify(w600)}; Carol ${JSON.stringify(c600)}`);
    assert.equal(c600.width, 1280, `Carol, on an open link, keeps 1280x720 while Bob is limited: ${JSON.stringify(c600)}`);
    assert.ok(w600.width < 1280 && w600.fps >= 5, `Bob decodes a lower layer: ${JSON.stringify(w600)}`);
    assert.ok(w600.audioPps >= 40, `Bob's audio goes on at 600 kbit/s: ${JSON.stringify(w600)}`);
    assert.ok(w600.kbps < 600, `Bob's video fits the link: ${JSON.stringify(w600)}`);
    assert.ok((await env.server.metric('bandwidth_downgrades_total')) > down0, 'the server counted a downgrade for bandwidth');

    // 150 kbit/s: the video is paused and the client told; audio goes on.
    shape(150);
    t = Date.now();
    await waitFor('livekit-client to report Alice\'s video paused for Bob at 150 kbit/s', async () => (await streamState(bob, 'Alice')) === 'paused', 30000, 250);
    const pausedAfter = Date.now() - t;
    // What was queued on the link drains first.
    await sleep(3000);
    const w150 = await window(bob, 4000);
    const c150 = await window(carol);
    note(`150 kbit/s: paused (client told) ${pausedAfter} ms after the limit; then ${JSON.stringify(w150)}; Carol ${JSON.stringify(c150)}`);
    assert.equal(c150.width, 1280, `Carol keeps 1280x720 while Bob is paused: ${JSON.stringify(c150)}`);
    // Nothing is forwarded. str0m's probes pad with resent cached video
    // packets, which can complete a few stale frames lost on the link (a
    // few per second at most, some tens of kbit/s); the lowest layer
    // flowing would be ~20 fps and ~150 kbit/s.
    assert.ok(w150.fps < 5 && w150.kbps < 60, `no video flows while paused: ${JSON.stringify(w150)}`);
    assert.ok(w150.audioPps >= 40, `Bob's audio goes on while his video is paused: ${JSON.stringify(w150)}`);
    assert.ok((await env.server.metric('bandwidth_pauses_total')) > pauses0, 'the server counted a pause');
    assert.ok((await env.server.metric('bandwidth_paused_tracks')) >= 1, 'the paused-tracks gauge shows it');
    assert.equal(await roomMetric('room_bandwidth_paused_tracks', room), 1, 'the room\'s paused-tracks series shows it');
    assert.ok((await roomMetric('room_bandwidth_downgrades_total', room)) >= 2, 'the room\'s downgrades series counts the cuts');
    // Connection quality follows (announced every 5 s).
    const q = await waitFor('Bob\'s connection quality to drop to poor', async () => ((await ownQuality(bob)) === 'poor' ? 'poor' : null), 12000, 500);
    note(`150 kbit/s: Bob's own connection quality: ${q}`);

    // No limit: active again, then the top layer.
    shape(null);
    t = Date.now();
    await waitFor('Alice\'s video to be active again for Bob', async () => (await streamState(bob, 'Alice')) === 'active', 30000, 250);
    const resumed = Date.now() - t;
    await waitFor('Bob to receive the top layer again', async () => (await inboundVideo(bob, 'Alice'))?.width === 1280, 60000, 250);
    const top = Date.now() - t;
    const wOpen = await window(bob);
    const freezes = (await inboundVideo(bob, 'Alice')).freezeCount - freezes0;
    note(`limit lifted: active again after ${resumed} ms, top layer after ${top} ms; then ${JSON.stringify(wOpen)}; Bob's freezes while shaped: ${freezes}`);

    // Carol, on the open link, kept the top layer throughout.
    const c = await window(carol);
    assert.equal(c.width, 1280, `Carol keeps 1280x720: ${JSON.stringify(c)}`);
  } catch (e) {
    e.message += `\n${log.join('\n')}\nserver log tail:\n${env.server.log.filter(Boolean).slice(-30).join('\n')}`;
    throw e;
  } finally {
    shape(null);
    for (const p of people) await p.context.close();
  }
});
