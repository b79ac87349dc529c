// The server API as the Node server SDK (livekit-server-sdk, protobuf JSON
// over Twirp) drives it, with livekit-client in Chromium on the other end.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { useServerAndBrowser, openCall, waitFor, repo } from './harness.mjs';

const require = createRequire(import.meta.url);
const { RoomServiceClient, DataPacket_Kind, TrackSource } = require(join(repo, 'web', 'node_modules', 'livekit-server-sdk'));

const env = useServerAndBrowser({ before, after });

const events = (p, type) => p.page.evaluate((type) => window.moselleCall.events.filter((e) => e.type === type), type);

test('livekit-server-sdk manages a call in livekit-client', async () => {
  const svc = new RoomServiceClient(env.server.base, 'devkey', 'secret', { failover: false });
  const room = `api-${Date.now()}`;
  const created = await svc.createRoom({ name: room, metadata: 'm1', emptyTimeout: 60 });
  assert.equal(created.name, room);
  assert.equal(created.metadata, 'm1');
  assert.match(created.sid, /^RM_/);
  assert.deepEqual((await svc.listRooms([room])).map((r) => r.name), [room]);

  const alice = await openCall(env.browser, env.server, { room, name: 'Alice' });
  const bob = await openCall(env.browser, env.server, { room, name: 'Bob' });
  const mic = await waitFor('Alice to publish her microphone', async () => {
    const p = await svc.getParticipant(room, 'Alice');
    return p.tracks.find((t) => t.source === TrackSource.MICROPHONE);
  });
  assert.deepEqual((await svc.listParticipants(room)).map((p) => p.identity).sort(), ['Alice', 'Bob']);
  assert.equal(room, (await svc.listRooms([room]))[0].name);

  await svc.updateRoomMetadata(room, 'm2');
  await waitFor('Bob to see the room metadata', () => bob.page.evaluate(() => window.moselleCall.room.metadata === 'm2'));

  const info = await svc.updateParticipant(room, 'Alice', { metadata: 'am', attributes: { role: 'host' } });
  assert.equal(info.metadata, 'am');
  await waitFor("Bob to see Alice's metadata and attributes", () => bob.page.evaluate(() => {
    const a = window.moselleCall.room.remoteParticipants.get('Alice');
    return a?.metadata === 'am' && a?.attributes?.role === 'host';
  }));

  await svc.sendData(room, new TextEncoder().encode('from the API'), DataPacket_Kind.RELIABLE,
    { topic: 'news', destinationIdentities: ['Bob'] });
  await waitFor('Bob to get the API data packet', async () =>
    (await events(bob, 'data')).some((e) => e.text === 'from the API' && e.topic === 'news' && e.from === undefined));
  assert.ok(!(await events(alice, 'data')).length, 'the packet was for Bob only');

  const muted = await svc.mutePublishedTrack(room, 'Alice', mic.sid, true);
  assert.equal(muted.muted, true);
  await waitFor('Alice\'s own page to mute her microphone', () => alice.page.evaluate(() =>
    !window.moselleCall.room.localParticipant.isMicrophoneEnabled));
  await waitFor('Bob to see Alice muted', () => bob.page.evaluate((sid) =>
    window.moselleCall.room.remoteParticipants.get('Alice')?.trackPublications.get(sid)?.isMuted === true, mic.sid));
  await assert.rejects(svc.mutePublishedTrack(room, 'Alice', mic.sid, false),
    (e) => e.status === 412 && e.code === 'failed_precondition', 'remote unmute is refused');

  await svc.removeParticipant(room, 'Bob');
  await waitFor('Bob to be disconnected', async () => (await events(bob, 'disconnected')).length > 0);
  await assert.rejects(svc.getParticipant(room, 'Bob'), (e) => e.status === 404 && e.code === 'not_found');

  await svc.deleteRoom(room);
  await waitFor('Alice to be disconnected by the deletion', async () => (await events(alice, 'disconnected')).length > 0);
  assert.deepEqual(await svc.listRooms([room]), []);

  const wrong = new RoomServiceClient(env.server.base, 'devkey', 'not-the-secret', { failover: false });
  await assert.rejects(wrong.listRooms(), (e) => e.status === 401 && e.code === 'unauthenticated');
  for (const p of [alice, bob]) await p.context.close();
});
