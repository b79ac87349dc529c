// Adaptive stream and dynacast (a hidden video stops flowing, and the
// publisher stops encoding what nobody watches), active speakers that
// follow who talks, and connection quality updates.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { useServerAndBrowser, openCall, inboundVideo, outboundVideo, keepsDecoding, sizeVideoOf, waitFor, sleep } from './harness.mjs';

const env = useServerAndBrowser({ before, after });

/** framesEncoded per simulcast layer (rid) of the page's own camera. */
const encoded = async (p) => Object.fromEntries(Object.entries(await outboundVideo(p)).map(([rid, v]) => [rid, v.framesEncoded]));

async function encodedOver(p, ms) {
  const a = await encoded(p);
  await sleep(ms);
  const b = await encoded(p);
  return Object.fromEntries(Object.keys(b).map((k) => [k, b[k] - (a[k] || 0)]));
}

const setHidden = (p, who, hidden) => p.page.evaluate(([who, hidden]) => {
  document.getElementById(`tile-${who}`).style.display = hidden ? 'none' : '';
}, [who, hidden]);

test('a hidden video stops flowing; dynacast pauses what nobody watches; both come back', async () => {
  const room = `adaptive-${Date.now()}`;
  const alice = await openCall(env.browser, env.server, { room, name: 'Alice' });
  const bob = await openCall(env.browser, env.server, { room, name: 'Bob', query: { media: '0' } });
  // A large tile: Bob wants the top layer, so dynacast keeps all three on
  // while Alice's bandwidth estimate ramps up to them.
  await sizeVideoOf(bob, 'Alice', 1280, 720);
  await waitFor("Bob to decode Alice", async () => (await inboundVideo(bob, 'Alice'))?.framesDecoded > 10, 20000);
  const layers = await waitFor('Alice to send three layers', async () => {
    const g = await encodedOver(alice, 1000);
    return Object.keys(g).length === 3 && Object.values(g).every((n) => n > 5) ? g : null;
  }, 30000);
  assert.deepEqual(Object.keys(layers).sort(), ['f', 'h', 'q']);

  await setHidden(bob, 'Alice', true);
  await waitFor("Alice's video to stop reaching Bob once hidden", async () => {
    const a = await inboundVideo(bob, 'Alice');
    await sleep(1500);
    const b = await inboundVideo(bob, 'Alice');
    return b.bytes === a.bytes;
  }, 10000);
  // Nobody watches: after the dynacast delay every layer is paused.
  const paused = await waitFor('Alice to pause all layers', async () => {
    const g = await encodedOver(alice, 1000);
    return Object.values(g).every((n) => n === 0) ? g : null;
  }, 15000);
  console.log('dynacast, nobody watching:', JSON.stringify(paused));

  await setHidden(bob, 'Alice', false);
  await waitFor("Alice's video to reach Bob again", async () => {
    const a = await inboundVideo(bob, 'Alice');
    await sleep(1000);
    const b = await inboundVideo(bob, 'Alice');
    return b.framesDecoded - a.framesDecoded > 5;
  }, 15000);
  const resumed = await encodedOver(alice, 1000);
  assert.ok(Object.values(resumed).some((n) => n > 5), `a layer is encoded again: ${JSON.stringify(resumed)}`);
  for (const p of [alice, bob]) await p.context.close();
});

/** Start or stop one simulcast layer of the page's camera, as a browser short of uplink bandwidth does. */
const setLayerActive = (p, rid, active) => p.page.evaluate(async ([rid, active]) => {
  const pub = [...window.moselleCall.room.localParticipant.videoTrackPublications.values()][0];
  const sender = pub.track.sender;
  const params = sender.getParameters();
  for (const e of params.encodings) if (e.rid === rid) e.active = active;
  await sender.setParameters(params);
}, [rid, active]);

test('when the publisher stops the top layer, its subscriber gets the next one down, then the top again', async () => {
  const room = `fallback-${Date.now()}`;
  const alice = await openCall(env.browser, env.server, { room, name: 'Alice' });
  const bob = await openCall(env.browser, env.server, { room, name: 'Bob', query: { media: '0' } });
  await sizeVideoOf(bob, 'Alice', 1280, 720);
  const width = async () => (await inboundVideo(bob, 'Alice'))?.width || 0;
  await waitFor('Bob to receive the top layer', async () => (await width()) >= 1280, 30000);

  await setLayerActive(alice, 'f', false);
  const fell = await waitFor('Bob to fall back to a lower layer', async () => {
    const w = await width();
    return w > 0 && w < 1280 ? w : null;
  }, 10000);
  await keepsDecoding(alice, bob, 'Alice', 'Bob to keep decoding the lower layer');

  await setLayerActive(alice, 'f', true);
  await waitFor('Bob to return to the top layer', async () => (await width()) >= 1280, 20000);
  await keepsDecoding(alice, bob, 'Alice', 'Bob to keep decoding the top layer');
  console.log(`fallback while the top layer was off: ${fell} px wide`);
  for (const p of [alice, bob]) await p.context.close();
});

test('active speakers follow who talks; connection quality is reported', async () => {
  const room = `speak-${Date.now()}`;
  const alice = await openCall(env.browser, env.server, { room, name: 'Alice' });
  const bob = await openCall(env.browser, env.server, { room, name: 'Bob' });
  await bob.page.click('#mic'); // Bob mutes: only Alice's tone is heard
  const speakers = (p) => p.page.evaluate(() => window.moselleCall.room.activeSpeakers.map((s) => s.identity));
  await waitFor('Bob to see Alice as the only speaker', async () => {
    const s = await speakers(bob);
    return s.length === 1 && s[0] === 'Alice';
  }, 20000);
  await alice.page.click('#mic');
  await waitFor('nobody to be speaking once Alice mutes', async () => (await speakers(bob)).length === 0, 15000);
  await bob.page.click('#mic');
  await waitFor('Bob, unmuted, to be the speaker', async () => {
    const s = await speakers(alice);
    return s.includes('Bob') && !s.includes('Alice');
  }, 20000);

  // Quality reports arrive; on this loss-free path they settle on excellent
  // (the first window may include the connection's start).
  const q = await waitFor("an excellent quality report for Alice on Bob's page", () => bob.page.evaluate(() =>
    window.moselleCall.events.find((e) => e.type === 'quality' && e.who === 'Alice' && e.quality === 'excellent')), 25000);
  assert.equal(q.quality, 'excellent');
  for (const p of [alice, bob]) await p.context.close();
});
