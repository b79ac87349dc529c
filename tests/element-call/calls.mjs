// What the Element Call tests share: the environment (static server, a
// browser), a Synapse with its Moselle node, two users in a call with their
// checks (first frames, seeing and hearing, per-participant E2EE), a killed
// browser watched from the other side, logs.
import { before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  OUT, requireComponents, buildHost, startStatic, startSynapse, startMoselle, freePort, IP,
  launchBrowser, openUser, decodingOver, waitFor, killBrowser, sleep,
} from './lib.mjs';

export const KEYS = 'io.element.call.encryption_keys';
export const SESSION = { matrix_rtc_session: { wait_for_key_rotation_ms: 5000 } };
export const env = { statics: null, browser: null, apps: {} };

/** Register the file's before/after hooks: the static server and a browser (env). */
export function setup() {
  before(async () => {
    requireComponents();
    await buildHost();
    env.statics = await startStatic(env.apps);
    env.browser = await launchBrowser();
  });
  after(async () => {
    await env.browser?.close().catch(() => {});
    await env.statics?.close();
  });
}

/** A Synapse (with or without /rtc/transports pointing at Moselle) and its Moselle node. */
export async function backend(t, { transports, sticky = false }) {
  const httpPort = await freePort(IP);
  const synapse = await startSynapse({ transportUrl: transports ? `http://${IP}:${httpPort}` : '', sticky });
  t.after(() => synapse.stop());
  const moselle = await startMoselle(synapse, httpPort);
  t.after(() => moselle.stop());
  return { synapse, moselle };
}

/** `p`, or `fallback` if it fails or takes more than 3 s (a killed browser's page). */
const bounded = (p, fallback) => Promise.race([p.catch(() => fallback), new Promise((r) => setTimeout(() => r(fallback), 3000))]);

/** Keep every log of a test in tests/out/element-call-logs/<tag>-*.log, for reading afterwards. */
export async function saveLogs(tag, users, moselle, synapse) {
  const dir = join(OUT, 'element-call-logs');
  mkdirSync(dir, { recursive: true });
  for (const u of users) {
    const lk = await bounded(u.lk(), null);
    const h = await bounded(u.host(), u.lastHost || 'page gone');
    writeFileSync(join(dir, `${tag}-${u.name}.log`), `${JSON.stringify(h, null, 1)}\n`
      + `token service calls: ${JSON.stringify(u.tokenCalls)}\nLiveKit signaling: ${JSON.stringify(lk)}\n${u.log.join('\n')}\n`);
  }
  if (moselle) writeFileSync(join(dir, `${tag}-moselle.log`), moselle.log.join('\n') + '\n');
  if (synapse) writeFileSync(join(dir, `${tag}-synapse.log`), `synapse dir: ${synapse.dir}\n${synapse.log.join('')}`);
}

/** Fail with everything that helps: the host's view, the page logs, Moselle's log. */
export async function explain(e, users, moselle) {
  const parts = [e.stack || e.message];
  for (const u of users) {
    parts.push(`--- ${u.name} host: ${JSON.stringify(await bounded(u.host(), u.lastHost || 'page gone'))}`);
    parts.push(`--- ${u.name} log (last 60):\n${u.log.slice(-60).join('\n')}`);
  }
  if (moselle) parts.push(`--- moselle log (last 60):\n${moselle.log.slice(-60).join('\n')}`);
  return new Error(parts.join('\n'));
}

/** Wait until `user` decodes `n` remote videos (5+ frames in a 1 s window) and hears `n` remote audios. */
export async function seesAndHears(user, n, what, timeoutMs = 45000) {
  let last;
  try {
    return await waitFor(what, async () => {
      last = await decodingOver(user, 1000);
      const fluent = last.video.filter((v) => v.delta >= 5 && v.width > 0).length;
      return fluent >= n && last.hearingAudios >= n ? last : null;
    }, timeoutMs, 0);
  } catch (e) {
    throw new Error(`${e.message}; last window: ${JSON.stringify(last)}`);
  }
}

/** When (epoch ms) `user` had decoded frames of `n` remote videos (polled every 100 ms). */
export async function firstFrame(user, n = 1, timeoutMs = 60000) {
  await waitFor(`${user.name} to decode frames of ${n} remote video(s)`, async () => {
    const s = await user.inbound();
    return s && s.video.filter((v) => v.framesDecoded > 0 && v.width > 0).length >= n;
  }, timeoutMs, 100);
  return Date.now();
}

/** When (epoch ms) `user`'s host received the first media key from each peer. */
export const keysFrom = (h) => Object.fromEntries(h.keysLog.filter((k) => k.dir === 'received').reverse().map((k) => [k.peer.split(':')[0], k.at]));

/** "join" to first decoded remote frame, for the log: from the widget's load and from io.element.join. */
export function timing(name, times, frameAt, peerJoinedAt) {
  const fromLoad = frameAt - times.widgetCreated;
  const fromJoin = frameAt - times.joined;
  const fromBoth = frameAt - Math.max(times.joined, peerJoinedAt || 0);
  console.log(`timing ${name}: first decoded remote frame ${fromLoad} ms after the widget was loaded, `
    + `${fromJoin} ms after it joined (io.element.join)`
    + (peerJoinedAt ? `, ${fromBoth} ms after both were in the call` : ''));
}

export function e2eeSummary(name, h, win) {
  console.log(`e2ee ${name}: media keys sent ${JSON.stringify(h.toDeviceSent[KEYS] || {})}, `
    + `received ${JSON.stringify(h.toDeviceReceived[KEYS] || {})}; frame transforms ${JSON.stringify(win.e2ee)}`);
  assert.ok(h.toDeviceSent[KEYS]?.encrypted > 0 && h.toDeviceSent[KEYS]?.devices > 0, `${name} sent its media key, Olm-encrypted, over Matrix`);
  assert.equal(h.toDeviceSent[KEYS]?.clear, undefined, `${name} sent no media key in clear`);
  assert.equal(h.toDeviceSent[KEYS]?.unknownDevices, undefined, `${name}'s crypto knew every device it had to send a key to`);
  assert.ok(h.toDeviceReceived[KEYS]?.encrypted > 0, `${name} received media keys, Olm-encrypted`);
  assert.equal(h.toDeviceReceived[KEYS]?.clear, undefined, `${name} received no media key in clear`);
  assert.ok(win.e2ee && win.e2ee.senders > 0 && win.e2ee.receivers > 0,
    `${name}'s app runs every sent and received frame through its E2EE transform: ${JSON.stringify(win.e2ee)}`);
}

/** Alice starts the call, Bob joins; both see and hear each other with per-participant E2EE. */
export async function twoUsersCall(app, synapse, users, { bobBrowser = env.browser, bobOnlineFirst = false } = {}) {
  // bobOnlineFirst: Bob's client is online (its device keys uploaded) before
  // Alice starts the call, as a member's Element usually is; it opens the app
  // when she is in. Needed when memberships are encrypted room events
  // (matrix_2_0): a device unknown when a membership was sent cannot decrypt it.
  let bob = null;
  if (bobOnlineFirst) {
    bob = await openUser(bobBrowser, { statics: env.statics, app, synapse, name: 'bob', intent: 'join_existing', hold: true });
    users.push(bob);
    await waitFor('Bob\'s client to be online', async () => (await bob.host()).state === 'online, holding', 60000);
  }
  const alice = await openUser(env.browser, { statics: env.statics, app, synapse, name: 'alice', intent: 'start_call' });
  users.push(alice);
  await waitFor('Alice to join the call', async () => (await alice.host()).times.joined !== undefined, 60000);
  if (bob) {
    await bob.page.evaluate(() => window.host.release());
  } else {
    bob = await openUser(bobBrowser, { statics: env.statics, app, synapse, name: 'bob', intent: 'join_existing' });
    users.push(bob);
  }

  const [aFrame, bFrame] = await Promise.all([firstFrame(alice), firstFrame(bob)]);
  const [a0, b0] = [await alice.host(), await bob.host()];
  timing('Alice (started the call)', a0.times, aFrame, b0.times.joined);
  timing('Bob (joined the running call)', b0.times, bFrame);
  console.log(`timing keys: Alice got Bob's media key ${keysFrom(a0)['@bob'] - b0.times.joined} ms and Bob got Alice's ${keysFrom(b0)['@alice'] - b0.times.joined} ms after Bob joined`);

  const aWin = await seesAndHears(alice, 1, 'Alice to see and hear Bob');
  const bWin = await seesAndHears(bob, 1, 'Bob to see and hear Alice');
  for (const [name, w] of [['Alice', aWin], ['Bob', bWin]]) {
    console.log(`${name} receives: video ${JSON.stringify(w.video.map(({ width, height, delta, framesDecoded }) => ({ width, height, fps: delta, framesDecoded })))}, `
      + `audio ${JSON.stringify(w.audio.map(({ dPackets, dEnergy }) => ({ packetsPerS: dPackets, energyPerS: +dEnergy.toFixed(4) })))}`);
  }
  e2eeSummary('Alice', await alice.host(), aWin);
  e2eeSummary('Bob', await bob.host(), bWin);
  return { alice, bob };
}

/** Which SFU the app found, from its own log line. */
export function discovered(user) {
  const line = user.log.find((l) => /Found (backend|app config) transport/.test(l));
  return line ? line.replace(/^.*Found /, 'Found ') : null;
}


/** `[room] resume_window_secs` of a node's configuration file. */
export function resumeWindowSecs(configPath) {
  const m = /^\s*resume_window_secs\s*=\s*(\d+)/m.exec(readFileSync(configPath, 'utf8'));
  if (!m) throw new Error(`no resume_window_secs in ${configPath}`);
  return Number(m[1]);
}

/**
 * kill -9 Bob's browser (his own, `bobBrowser`) in a call with Alice, and
 * watch from Alice's side how his membership ends: her app's decoding of his
 * video, her LiveKit client's ParticipantUpdate, Moselle's delegated leave
 * (metric), Synapse's room state (`roomState`: compatibility mode's
 * call.member state events; matrix_2_0 has none), her client receiving the
 * membership's end (state or sticky event) and her app's tile. Asserts the
 * membership ended within Moselle's resume window + 10 s, by Moselle's
 * delegated leave. `label` names the mode in the timing line.
 */
export async function killBobAndWatch({ label, alice, bob, bobBrowser, bobIdentity, moselle, synapse, roomState }) {
  const bobId = synapse.users.bob.user_id;
  const windowSecs = resumeWindowSecs(moselle.config);
  const leaves0 = await moselle.metric('matrix_delegated_leaves_sent_total');
  const lk0 = await alice.lk();
  assert.ok(lk0.participants[bobIdentity] && lk0.participants[bobIdentity].disconnectedAt === undefined,
    `Alice's LiveKit client knows Bob (${bobIdentity}): ${JSON.stringify(lk0)}`);
  const tiles0 = (await alice.inbound()).tiles.length;
  assert.equal(tiles0, 2, 'Alice\'s app shows two tiles before the kill');
  if (roomState) {
    const state0 = await synapse.callMembers();
    assert.ok(state0.some((m) => m.active && m.sender === bobId), 'Bob\'s call membership is in the room state');
  }
  bob.lastHost = await bob.host();

  // kill -9 Bob's browser: no hang-up, no leave event, no goodbye to the SFU.
  const kill = await killBrowser(bobBrowser);
  console.log(`${label}: killed Bob's browser, SIGKILL to ${kill.pids.length} processes`);

  const seen = {};
  const since = (at) => (at === undefined ? 'never' : `${at - kill.at} ms`);
  let lastFrames = null;
  let lastFrameAt = kill.at;
  const needed = ['decodingStopped', 'lkGone', 'leaveSent', 'aliceClient', ...(roomState ? ['stateEmpty'] : [])];
  await waitFor('Bob\'s membership to end everywhere after the kill', async () => {
    const at = Date.now();
    const s = await alice.inbound();
    const frames = s.video.reduce((n, v) => n + v.framesDecoded, 0);
    if (lastFrames === null || frames > lastFrames) lastFrameAt = at;
    lastFrames = frames;
    if (seen.decodingStopped === undefined && at - lastFrameAt >= 1000) seen.decodingStopped = lastFrameAt;
    if (seen.tileGone === undefined && s.tiles.length < tiles0) seen.tileGone = at;
    const lk = await alice.lk();
    if (seen.lkGone === undefined && lk.participants[bobIdentity]?.disconnectedAt) seen.lkGone = lk.participants[bobIdentity].disconnectedAt;
    if (seen.leaveSent === undefined && (await moselle.metric('matrix_delegated_leaves_sent_total')) > leaves0) seen.leaveSent = at;
    if (roomState && seen.stateEmpty === undefined) {
      const m = await synapse.callMembers();
      if (!m.some((x) => x.active && x.sender === bobId)) seen.stateEmpty = at;
    }
    if (seen.aliceClient === undefined) {
      const h = await alice.host();
      const e = h.memberLog.find((x) => x.sender === bobId && !x.active && x.at >= kill.at);
      if (e) { seen.aliceClient = e.at; seen.aliceClientKind = `${e.kind} ${e.type}`; }
    }
    // The tile goes with the membership; give it a few seconds after that.
    return needed.every((k) => seen[k] !== undefined) && (seen.tileGone !== undefined || at - seen.aliceClient > 8000);
  }, (windowSecs + 40) * 1000, 200);

  // Moselle's own account, from its log's timestamps.
  const mlog = moselle.log.map((l) => l.replace(/\x1b\[[0-9;]*m/g, ''));
  const ts = (l) => (l ? Date.parse(l.slice(0, l.indexOf('Z') + 1)) : undefined);
  const lost = mlog.find((l) => l.includes('signaling lost') && ts(l) >= kill.at - 1000);
  const pa = /participant=(\S+)/.exec(lost || '')?.[1];
  const left = pa && mlog.find((l) => l.includes('participant left') && l.includes(`participant=${pa}`));
  const sent = mlog.find((l) => l.includes('delegated leave sent') && ts(l) >= kill.at);
  console.log(`timing kill -9, ${label}, Moselle's log: signaling lost ${since(ts(lost))}, participant removed ${since(ts(left))}, `
    + `delegated leave sent (homeserver answered) ${since(ts(sent))} after the kill`);
  console.log(`timing kill -9, ${label} (resume window ${windowSecs} s): Alice's app stopped decoding Bob's video ${since(seen.decodingStopped)} after the kill; `
    + `her LiveKit client was told Bob left (ParticipantUpdate DISCONNECTED) ${since(seen.lkGone)}; `
    + `Moselle's metric counted the delegated leave ${since(seen.leaveSent)}; `
    + (roomState ? `Synapse's room state had Bob's call.member empty ${since(seen.stateEmpty)}; ` : '')
    + `Alice's client received the end of his membership (${seen.aliceClientKind}) ${since(seen.aliceClient)}; `
    + `Alice's app dropped Bob's tile ${since(seen.tileGone)}`);
  const limit = (windowSecs + 10) * 1000;
  assert.ok(seen.aliceClient - kill.at < limit && (!roomState || seen.stateEmpty - kill.at < limit),
    `Bob's call membership ended within the resume window (${windowSecs} s) + 10 s: at Alice ${since(seen.aliceClient)}`
    + (roomState ? `, room state ${since(seen.stateEmpty)}` : ''));
  assert.equal(await moselle.metric('matrix_delegated_leaves_sent_total'), leaves0 + 1, 'Moselle fired exactly one delegated leave (Bob\'s)');
  assert.ok(sent, 'Moselle logged "delegated leave sent" after the kill');
  assert.ok(seen.tileGone !== undefined, 'Alice\'s app dropped Bob\'s tile');
  assert.ok(seen.lkGone - kill.at < limit, 'Alice\'s LiveKit client dropped Bob within the resume window + 10 s');
  await sleep(500);
  assert.equal((await alice.host()).state, 'in call', 'Alice\'s app is still in the call');
  return { kill, seen };
}
