// The call page: two people join from browsers, see and hear each other,
// mute, and see who speaks. One screenshot is written to tests/out/.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { useServerAndBrowser, openCall, inboundVideo, framesOver, waitFor, OUT } from './harness.mjs';

const env = useServerAndBrowser({ before, after });

test('two people see and hear each other on the call page, mute shows, speaker shows', async () => {
  const room = `page-${Date.now()}`;
  const alice = await openCall(env.browser, env.server, { room, name: 'Alice' });
  const bob = await openCall(env.browser, env.server, { room, name: 'Bob' });

  for (const [me, other] of [[alice, 'Bob'], [bob, 'Alice']]) {
    const st = await waitFor(`${me.name} to decode ${other}'s video`, async () => {
      const s = await inboundVideo(me, other);
      return s && s.framesDecoded > 15 ? s : null;
    }, 20000);
    assert.ok(st.width > 0, `${me.name} decoded ${other}'s frames with no size`);
    // The tile shows a playing video element with a real size.
    await waitFor(`${me.name}'s tile for ${other} to play video`, () => me.page.evaluate((other) => {
      const v = document.querySelector(`#tile-${other} video`);
      return v && v.videoWidth > 0 && !v.paused;
    }, other));
    // Audio is subscribed and attached.
    await waitFor(`${me.name} to have ${other}'s audio`, () => me.page.evaluate((other) => {
      const rp = [...window.moselleCall.room.remoteParticipants.values()].find((x) => x.identity === other);
      const pub = rp && [...rp.audioTrackPublications.values()][0];
      return !!(pub && pub.isSubscribed && pub.track && document.querySelector(`#tile-${other} audio`));
    }, other));
  }
  // Two seconds: the first layer switch of a call waits for a keyframe.
  const flowing = await framesOver(alice, 'Bob', 2000);
  assert.ok(flowing > 10, `video keeps flowing: ${flowing} frames of Bob's video decoded by Alice in 2 s`);

  // Mute: Alice clicks "Mute microphone"; Bob's page marks her muted.
  await alice.page.click('#mic');
  await waitFor("Bob's page to show Alice muted", () => bob.page.evaluate(() => document.querySelector('#tile-Alice .name')?.textContent.includes('(muted)')));
  await alice.page.click('#mic');
  await waitFor("Bob's page to show Alice unmuted", () => bob.page.evaluate(() => !document.querySelector('#tile-Alice .name')?.textContent.includes('(muted)')));

  // Chromium's fake microphone beeps: the page names a speaker.
  await waitFor('a speaker to be shown on Bob\'s page', () => bob.page.evaluate(() => {
    const t = document.querySelector('#speaker b')?.textContent || '';
    return t.includes('Alice') || t.includes('Bob');
  }), 20000);

  await bob.page.screenshot({ path: join(OUT, 'call-page.png') });
  assert.deepEqual(alice.errors.filter((e) => !e.includes('favicon')), []);
  await alice.context.close();
  await bob.context.close();
});
