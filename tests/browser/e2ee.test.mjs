// End-to-end encryption with livekit-client's shared-key E2EE: the SFU
// forwards ciphertext it cannot read, still picks simulcast layers (its
// keyframe detection reads only the bytes left in clear), and a participant
// with the wrong key decodes nothing.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { useServerAndBrowser, openCall, inboundVideo, keepsDecoding, sizeVideoOf, waitFor, sleep } from './harness.mjs';

const env = useServerAndBrowser({ before, after });

test('E2EE: same key decodes and switches layers by element size; wrong key decodes nothing', async () => {
  const room = `e2ee-${Date.now()}`;
  const alice = await openCall(env.browser, env.server, { room, name: 'Alice', e2ee: 'correct horse' });
  const bob = await openCall(env.browser, env.server, { room, name: 'Bob', e2ee: 'correct horse', query: { media: '0' } });
  const carol = await openCall(env.browser, env.server, { room, name: 'Carol', e2ee: 'wrong key', query: { media: '0' } });

  // The publication is marked encrypted for the receivers.
  const enc = await waitFor("Bob to see Alice's camera", () => bob.page.evaluate(() => {
    const a = [...window.moselleCall.room.remoteParticipants.values()].find((p) => p.identity === 'Alice');
    const pub = a && [...a.videoTrackPublications.values()][0];
    return pub && pub.isSubscribed ? { encrypted: pub.isEncrypted, mime: pub.mimeType } : null;
  }));
  assert.equal(enc.encrypted, true, 'TrackInfo.encryption must reach the subscriber');
  assert.match(enc.mime, /^video\//);

  // Bob (right key) decodes Alice.
  await waitFor("Bob to decode Alice's encrypted video", async () => (await inboundVideo(bob, 'Alice'))?.framesDecoded > 20, 20000);

  // Adaptive stream: a small element gets the low layer, a large one the top.
  await sizeVideoOf(bob, 'Alice', 160, 90);
  const low = await waitFor('Bob to receive a small layer for a small element', async () => {
    const s = await inboundVideo(bob, 'Alice');
    return s && s.width > 0 && s.width <= 320 ? s : null;
  }, 20000);
  await sizeVideoOf(bob, 'Alice', 1280, 720);
  const high = await waitFor('Bob to receive the top layer for a large element', async () => {
    const s = await inboundVideo(bob, 'Alice');
    return s && s.width >= 1280 ? s : null;
  }, 20000);
  const after = await keepsDecoding(alice, bob, 'Alice', 'Bob to keep decoding after the switches');
  console.log(`E2EE after the switches: ${JSON.stringify(after)}`);
  console.log(`E2EE layers seen by Bob: low ${low.width}x${low.height}, high ${high.width}x${high.height}`);

  // Carol (wrong key) receives packets but decodes no frame.
  const carolStats = await waitFor("Carol to receive Alice's packets", () => carol.page.evaluate(async () => {
    const a = [...window.moselleCall.room.remoteParticipants.values()].find((p) => p.identity === 'Alice');
    const pub = a && [...a.videoTrackPublications.values()][0];
    if (!pub?.track) return null;
    let out = null;
    (await pub.track.getRTCStatsReport())?.forEach((s) => {
      if (s.type === 'inbound-rtp') out = { packets: s.packetsReceived || 0, decoded: s.framesDecoded || 0 };
    });
    return out && out.packets > 100 ? out : null;
  }), 20000);
  assert.equal(carolStats.decoded, 0, `with the wrong key nothing may decode: ${JSON.stringify(carolStats)}`);
  const errors = await carol.page.evaluate(() => window.moselleCall.events.filter((e) => e.type === 'encryption_error').length);
  assert.ok(errors > 0, 'Carol\'s client reports decryption errors');

  // Carol's decoder keeps asking for keyframes that cannot help her; the
  // server holds those requests back so Alice does not send keyframes on
  // every layer several times a second. Without that, the 600 ms per-layer
  // throttle alone lets about 6 through in 4 s.
  await waitFor('the server to hold back Carol\'s useless keyframe requests',
    async () => (await env.server.metric('keyframe_requests_ignored_total')) > 0, 10000);
  const sentBefore = await env.server.metric('keyframe_requests_total');
  await sleep(4000);
  const sent = (await env.server.metric('keyframe_requests_total')) - sentBefore;
  console.log(`keyframe requests passed to Alice in 4 s while Carol fails: ${sent}`);
  assert.ok(sent <= 3, `keyframe requests passed to Alice in 4 s while Carol fails: ${sent}`);

  for (const p of [alice, bob, carol]) await p.context.close();
});
