// Shared pieces of the browser tests: a Moselle server on the namespace's
// address, headless Chromium (Debian's) through playwright-core, and the
// call page driven like a person would drive it.
import { spawn } from 'node:child_process';
import { createServer } from 'node:net';
import { get as httpsGet } from 'node:https';
import { createRequire } from 'node:module';
import { appendFileSync, mkdirSync, writeFileSync } from 'node:fs';

import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const here = dirname(fileURLToPath(import.meta.url));
export const repo = join(here, '..', '..');
const { chromium } = require(join(repo, 'web', 'node_modules', 'playwright-core'));

export const HOST = process.env.MOSELLE_TEST_IP || '127.0.0.1';
export const OUT = join(repo, 'tests', 'out');
mkdirSync(OUT, { recursive: true });

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(what, fn, timeoutMs = 15000, everyMs = 200) {
  const end = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${describe(last)}`);
    await sleep(everyMs);
  }
}

function describe(v) {
  if (v instanceof Error) return v.message;
  try { return JSON.stringify(v); } catch { return String(v); }
}

function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, HOST, () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

/**
 * Start `moselle serve --dev` on free ports; resolves once /healthz is 200.
 * For the network lab (tests/netlab.sh): `host` to bind, fixed `ports`
 * ({ http, udp }; this namespace cannot probe the server's for free ones, so
 * give `--tcp-port` too) and `netns` to run it in with `ip netns exec`.
 */
export async function startServer(extraArgs = [], opts = {}) {
  // Free ports are probed, released, then bound by the child: another process
  // can take one in between. Only that case is retried, on new ports.
  for (let attempt = 0; ; attempt++) {
    try {
      return await startServerOnce(extraArgs, opts);
    } catch (e) {
      if (opts.ports || attempt >= 2 || !/in use/i.test(String(e.message))) throw e;
      console.error('[moselle] a port was taken before it bound; retrying');
    }
  }
}

/** GET `url` → status (null if unreachable); `ca` (PEM) trusts a test certificate. */
function getStatus(url, ca) {
  if (!ca) return fetch(url).then((r) => r.status).catch(() => null);
  return new Promise((resolve) => {
    const req = httpsGet(url, { ca }, (r) => { r.resume(); resolve(r.statusCode); });
    req.on('error', () => resolve(null));
  });
}

async function startServerOnce(extraArgs, { host = HOST, ports = null, netns = null, ca = null }) {
  const bin = process.env.MOSELLE_BIN || join(repo, 'target', 'debug', 'moselle');
  const httpPort = ports ? ports.http : await freePort();
  const udpPort = ports ? ports.udp : await freePort();
  // ICE over TCP listens too: a free port keeps servers side by side apart.
  const tcpArgs = extraArgs.includes('--tcp-port') ? [] : ['--tcp-port', String(await freePort())];
  const args = ['serve', '--dev', '--bind', host, '--http-port', String(httpPort), '--udp-port', String(udpPort), ...tcpArgs, ...extraArgs];
  // `ip netns exec` execs moselle: the child is the server itself.
  const [cmd, argv] = netns ? ['ip', ['netns', 'exec', netns, bin, ...args]] : [bin, args];
  const proc = spawn(cmd, argv, {
    cwd: repo,
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const log = [];
  // MOSELLE_LOG_FILE: keep the whole server log there too (for debugging).
  const file = process.env.MOSELLE_LOG_FILE;
  const keep = (d) => {
    if (file) appendFileSync(file, d);
    log.push(...d.toString().split('\n'));
    if (log.length > 400) log.splice(0, log.length - 400);
  };
  proc.stdout.on('data', keep);
  proc.stderr.on('data', keep);
  let exited = null;
  proc.on('exit', (code) => { exited = code; });
  // `ca`: the server was given a certificate (its config) signed by it.
  const base = `${ca ? 'https' : 'http'}://${host}:${httpPort}`;
  await waitFor('the server to answer /healthz', async () => {
    if (exited !== null) throw new Error(`moselle exited with ${exited}:\n${log.join('\n')}`);
    return (await getStatus(`${base}/healthz`, ca)) === 200;
  }, 10000, 100);
  return {
    base,
    udpPort,
    log,
    async metric(name) {
      const text = await (await fetch(`${base}/metrics`)).text();
      const line = text.split('\n').find((l) => l.startsWith(`moselle_${name} `));
      if (!line) throw new Error(`metric moselle_${name} not exported`);
      return Number(line.split(' ')[1]);
    },
    async stop() {
      if (exited === null) {
        proc.kill('SIGTERM');
        await Promise.race([new Promise((r) => proc.on('exit', r)), sleep(3000)]);
        if (exited === null) proc.kill('SIGKILL');
      }
    },
  };
}

/** A 440 Hz tone as a WAV file: Chromium's fake microphone plays it in a
 * loop, so there is a continuous speaker (its default beep is too short). */
function toneWav(path, seconds = 5, rate = 48000, hz = 440) {
  const n = seconds * rate;
  const buf = Buffer.alloc(44 + n * 2);
  buf.write('RIFF', 0); buf.writeUInt32LE(36 + n * 2, 4); buf.write('WAVE', 8);
  buf.write('fmt ', 12); buf.writeUInt32LE(16, 16); buf.writeUInt16LE(1, 20); buf.writeUInt16LE(1, 22);
  buf.writeUInt32LE(rate, 24); buf.writeUInt32LE(rate * 2, 28); buf.writeUInt16LE(2, 32); buf.writeUInt16LE(16, 34);
  buf.write('data', 36); buf.writeUInt32LE(n * 2, 40);
  for (let i = 0; i < n; i++) buf.writeInt16LE(Math.round(12000 * Math.sin((2 * Math.PI * hz * i) / rate)), 44 + i * 2);
  writeFileSync(path, buf);
  return path;
}

/** Debian's Chromium, headless, with a fake camera and microphone. The
 * server's plain-HTTP origin is treated as secure so getUserMedia works.
 * `netns`: run it in that network namespace (the lab's other hosts). */
export async function launchBrowser(server, { netns = null, trustSpki = null } = {}) {
  return chromium.launch({
    executablePath: netns ? join(here, '..', 'browser-lab', 'chromium-in-netns.sh') : '/usr/bin/chromium',
    env: netns ? { ...process.env, MOSELLE_CHROMIUM_NETNS: netns } : process.env,
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-quic',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection', '--autoplay-policy=no-user-gesture-required',
      `--unsafely-treat-insecure-origin-as-secure=${server.base}`,
      `--use-file-for-fake-audio-capture=${toneWav(join(OUT, 'tone-440.wav'))}`,
      // Trust exactly one test certificate's key, nothing else.
      ...(trustSpki ? [`--ignore-certificate-errors-spki-list=${trustSpki}`] : []),
    ],
  });
}

/**
 * A participant: one browser context with the call page open.
 * opts: { room, name, e2ee, query }
 */
export async function openCall(browser, server, opts) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e.stack || e)));
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') errors.push(m.text() + ' @' + JSON.stringify(m.location())); });
  const q = new URLSearchParams({ room: opts.room, name: opts.name, ...(opts.e2ee ? { e2ee: opts.e2ee } : {}), ...(opts.query || {}) });
  await page.goto(`${server.base}/call/?${q}`);
  if (opts.autojoin !== false) {
    await page.click('#join button[type=submit]');
    await waitFor(`${opts.name} to connect`, () => page.evaluate(() => window.moselleCall.events.some((e) => e.type === 'connected')), 20000)
      .catch(async (e) => {
        const err = await page.textContent('#error').catch(() => '');
        throw new Error(`${e.message}; page error: ${err}; console: ${errors.join(' | ')}`);
      });
  }
  return { context, page, errors, name: opts.name };
}

/** Give `who`'s video tile on this page a fixed size (adaptive stream asks for a layer by it). */
export const sizeVideoOf = (p, who, w, h) => p.page.addStyleTag({
  content: `#tile-${who} { width: ${w}px; height: ${h}px; aspect-ratio: auto; } #tile-${who} video { width: ${w}px; height: ${h}px; }`,
});

/** Inbound video stats of the track `from` publishes, as this page sees it. */
export async function inboundVideo(p, from) {
  return p.page.evaluate(async (from) => {
    const room = window.moselleCall.room;
    const rp = [...room.remoteParticipants.values()].find((x) => x.identity === from);
    if (!rp) return null;
    const pub = [...rp.videoTrackPublications.values()][0];
    if (!pub || !pub.track) return null;
    const report = await pub.track.getRTCStatsReport();
    let out = null;
    report?.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') {
        out = { framesDecoded: s.framesDecoded || 0, width: s.frameWidth || 0, height: s.frameHeight || 0,
                nackCount: s.nackCount || 0, bytes: s.bytesReceived || 0, keyFrames: s.keyFramesDecoded || 0,
                framesReceived: s.framesReceived || 0, framesDropped: s.framesDropped || 0,
                packets: s.packetsReceived || 0, packetsLost: s.packetsLost || 0,
                pliCount: s.pliCount || 0, freezeCount: s.freezeCount || 0 };
      }
    });
    return out;
  }, from);
}

/** Inbound audio stats (packets, audio energy) of the track `from` publishes, as this page sees it. */
export async function inboundAudio(p, from) {
  return p.page.evaluate(async (from) => {
    const rp = [...window.moselleCall.room.remoteParticipants.values()].find((x) => x.identity === from);
    const pub = rp && [...rp.audioTrackPublications.values()][0];
    if (!pub || !pub.track) return null;
    let out = null;
    (await pub.track.getRTCStatsReport())?.forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'audio') {
        out = { packets: s.packetsReceived || 0, energy: s.totalAudioEnergy || 0, concealed: s.concealedSamples || 0,
                samples: s.totalSamplesReceived || 0 };
      }
    });
    return out;
  }, from);
}

/** livekit-client's stream state ('active', 'paused') of `from`'s video on this page. */
export const streamState = (p, from) => p.page.evaluate((from) => {
  const rp = [...window.moselleCall.room.remoteParticipants.values()].find((x) => x.identity === from);
  const pub = rp && [...rp.videoTrackPublications.values()][0];
  return pub?.track?.streamState ?? null;
}, from);

/** Outbound stats of the page's own camera, per simulcast layer (rid, or `single`). */
export async function outboundVideo(p) {
  return p.page.evaluate(async () => {
    const pub = [...window.moselleCall.room.localParticipant.videoTrackPublications.values()][0];
    const out = {};
    (await pub?.track?.sender?.getStats())?.forEach((s) => {
      if (s.type === 'outbound-rtp') {
        out[s.rid || 'single'] = { framesEncoded: s.framesEncoded || 0, framesSent: s.framesSent || 0,
                                   packets: s.packetsSent || 0, width: s.frameWidth || 0,
                                   fps: s.framesPerSecond || 0, limitation: s.qualityLimitationReason };
      }
    });
    return out;
  });
}

/**
 * What happened to `from`'s video between publisher `pub` and subscriber
 * `sub` over `ms`: per layer what the publisher encoded and sent, and what
 * the subscriber received, decoded and dropped, with losses, keyframes,
 * PLIs and freezes. For assertions' messages: it tells a slow publisher
 * from a forwarding fault.
 */
export async function videoOver(pub, sub, from, ms) {
  const gauges = new Set(['width', 'height', 'fps', 'limitation']);
  const diff = (a, b) => Object.fromEntries(Object.entries(b || {})
    .map(([k, v]) => [k, typeof v === 'number' && !gauges.has(k) ? v - ((a || {})[k] || 0) : v]));
  const [o0, i0] = [await outboundVideo(pub), await inboundVideo(sub, from)];
  await sleep(ms);
  const [o1, i1] = [await outboundVideo(pub), await inboundVideo(sub, from)];
  return {
    sent: Object.fromEntries(Object.entries(o1).map(([rid, v]) => [rid, diff(o0[rid], v)])),
    got: diff(i0, i1),
  };
}

/**
 * Wait until `sub` decodes more than `min` frames of `from`'s video within
 * one `ms` window. One window right after a change can be short of frames
 * for reasons outside the server (a top layer the publisher is still
 * ramping up, a busy machine dropping frames before decode), so windows
 * repeat until `timeoutMs`; a fault that lasts still fails, with what the
 * publisher sent and the subscriber got in the last window.
 */
export async function keepsDecoding(pub, sub, from, what, { min = 10, ms = 1500, timeoutMs = 12000 } = {}) {
  let last;
  try {
    return await waitFor(what, async () => {
      last = await videoOver(pub, sub, from, ms);
      return last.got.framesDecoded > min ? last : null;
    }, timeoutMs, 0);
  } catch (e) {
    throw new Error(`${e.message}; last window: ${JSON.stringify(last)}`);
  }
}

/** Frames decoded from `from`'s video over `ms`. */
export async function framesOver(p, from, ms) {
  const a = await inboundVideo(p, from);
  await sleep(ms);
  const b = await inboundVideo(p, from);
  return (b?.framesDecoded || 0) - (a?.framesDecoded || 0);
}

/**
 * One server and one browser for a test file, started before its tests and
 * stopped after them. Returns a live view: `env.server`, `env.browser`.
 */
export function useServerAndBrowser(hooks) {
  const env = { server: null, browser: null };
  hooks.before(async () => {
    env.server = await startServer();
    env.browser = await launchBrowser(env.server);
  });
  hooks.after(async () => {
    await env.browser?.close();
    await env.server?.stop();
  });
  return env;
}
