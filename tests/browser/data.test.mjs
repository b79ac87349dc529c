// Data packets and participant metadata between browsers (livekit-client).
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { useServerAndBrowser, openCall, waitFor, sleep } from './harness.mjs';

const env = useServerAndBrowser({ before, after });

const received = (p) => p.page.evaluate(() => window.moselleCall.events.filter((e) => e.type === 'data'));

test('reliable and lossy data reach the room, or only the named identities', async () => {
  const room = `data-${Date.now()}`;
  const ps = [];
  for (const name of ['Alice', 'Bob', 'Carol']) ps.push(await openCall(env.browser, env.server, { room, name, query: { media: '0' } }));
  const [a, b, c] = ps;
  await waitFor('everyone to see everyone', async () => {
    for (const p of ps) {
      const n = await p.page.evaluate(() => window.moselleCall.room.remoteParticipants.size);
      if (n !== 2) return false;
    }
    return true;
  });

  const send = (p, text, opts) => p.page.evaluate(([text, opts]) =>
    window.moselleCall.room.localParticipant.publishData(new TextEncoder().encode(text), opts), [text, opts]);
  await send(a, 'hello all', { reliable: true, topic: 't1' });
  await send(a, 'lossy hi', { reliable: false });
  await send(a, 'only carol', { reliable: true, destinationIdentities: ['Carol'] });

  for (const p of [b, c]) {
    await waitFor(`${p.name} to get Alice's reliable and lossy packets`, async () => {
      const got = await received(p);
      return got.some((e) => e.text === 'hello all' && e.from === 'Alice' && e.topic === 't1')
        && got.some((e) => e.text === 'lossy hi' && e.from === 'Alice');
    });
  }
  await waitFor('Carol to get the packet meant for her', async () => (await received(c)).some((e) => e.text === 'only carol' && e.from === 'Alice'));
  await sleep(500);
  assert.ok(!(await received(b)).some((e) => e.text === 'only carol'), 'Bob got a packet addressed only to Carol');
  assert.ok(!(await received(a)).length, 'the sender must not get its own packets back');
  for (const p of ps) await p.context.close();
});

test('metadata and attribute updates reach the others', async () => {
  const room = `meta-${Date.now()}`;
  const a = await openCall(env.browser, env.server, { room, name: 'Alice', query: { media: '0', canUpdateMetadata: '1' } });
  const b = await openCall(env.browser, env.server, { room, name: 'Bob', query: { media: '0' } });
  await waitFor('Bob to see Alice', () => b.page.evaluate(() => window.moselleCall.room.remoteParticipants.size === 1));
  await a.page.evaluate(async () => {
    const lp = window.moselleCall.room.localParticipant;
    await lp.setMetadata('{"status":"away"}');
    await lp.setAttributes({ mood: 'calm', hand: 'up' });
    await lp.setAttributes({ hand: '' });
  });
  await waitFor("Bob to see Alice's metadata and attributes", () => b.page.evaluate(() => {
    const alice = [...window.moselleCall.room.remoteParticipants.values()][0];
    return alice.metadata === '{"status":"away"}' && alice.attributes.mood === 'calm' && !('hand' in alice.attributes);
  }));
  // Without the grant, the update is refused and nothing changes.
  const err = await b.page.evaluate(async () => {
    try { await window.moselleCall.room.localParticipant.setMetadata('nope'); return null; } catch (e) { return String(e?.message || e); }
  });
  assert.ok(err, 'a participant without canUpdateOwnMetadata must get an error');
  await sleep(300);
  const seen = await a.page.evaluate(() => [...window.moselleCall.room.remoteParticipants.values()][0].metadata);
  assert.notEqual(seen, 'nope');
  await a.context.close();
  await b.context.close();
});
