// The pieces of the Element Call tests: our host page bundled with esbuild, a
// static server for it and the app, a Synapse (synapse_up.py), a Moselle node
// configured as the MatrixRTC token service for that Synapse, and Chromium.
// Everything missing is an error: these tests fail, never skip.
import { spawn } from 'node:child_process';
import { createServer as netServer, connect as netConnect } from 'node:net';
import { createServer as httpServer } from 'node:http';
import { createRequire } from 'node:module';
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, extname, join, normalize, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
export const here = dirname(fileURLToPath(import.meta.url));
export const repo = join(here, '..', '..');
export const OUT = join(repo, 'tests', 'out');
export const BUILD = join(here, 'build');
export const IP = process.env.MOSELLE_TEST_IP || '';
export const APP_DIST = join(here, 'node_modules', '@element-hq', 'element-call-embedded', 'dist');

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export async function waitFor(what, fn, timeoutMs = 15000, everyMs = 250) {
  const end = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) {
      const d = last instanceof Error ? last.message : JSON.stringify(last);
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${d}`);
    }
    await sleep(everyMs);
  }
}

/** Check what the tests need; throw (fail) with what is missing. */
export function requireComponents() {
  const missing = [];
  if (!IP) missing.push('MOSELLE_TEST_IP (run under tests/netns.sh, e.g. via tests/element-call/run.sh)');
  if (!existsSync('/usr/bin/chromium')) missing.push('/usr/bin/chromium');
  if (!existsSync(join(repo, '.venv', 'bin', 'python'))) missing.push('.venv (tests/python/requirements.txt, with matrix-synapse)');
  if (!existsSync(moselleBin())) missing.push(`moselle binary at ${moselleBin()} (MOSELLE_BIN)`);
  if (!existsSync(join(APP_DIST, 'index.html'))) missing.push('@element-hq/element-call-embedded (npm ci in tests/element-call)');
  if (!existsSync(join(here, 'node_modules', 'playwright-core'))) missing.push('playwright-core (npm ci in tests/element-call)');
  if (missing.length) throw new Error(`missing: ${missing.join('; ')}`);
}

export const moselleBin = () => process.env.MOSELLE_BIN || join(repo, 'target', 'debug', 'moselle');

/** Bundle host.js (matrix-js-sdk + matrix-widget-api) into build/, with the crypto wasm beside it. */
export async function buildHost() {
  const esbuild = require('esbuild');
  mkdirSync(join(BUILD, 'pkg'), { recursive: true });
  await esbuild.build({
    entryPoints: [join(here, 'host.js')],
    bundle: true,
    format: 'esm',
    platform: 'browser',
    target: 'chrome120',
    outfile: join(BUILD, 'host.js'),
    define: { global: 'globalThis' },
    logLevel: 'warning',
  });
  const wasm = join(here, 'node_modules', '@matrix-org', 'matrix-sdk-crypto-wasm', 'pkg', 'matrix_sdk_crypto_wasm_bg.wasm');
  copyFileSync(wasm, join(BUILD, 'pkg', 'matrix_sdk_crypto_wasm_bg.wasm'));
}

export function freePort(host = IP || '127.0.0.1', proto = 'tcp') {
  if (proto === 'udp') {
    return import('node:dgram').then(({ createSocket }) => new Promise((resolve, reject) => {
      const s = createSocket('udp4');
      s.on('error', reject);
      s.bind(0, host, () => { const { port } = s.address(); s.close(() => resolve(port)); });
    }));
  }
  return new Promise((resolve, reject) => {
    const s = netServer();
    s.listen(0, host, () => { const { port } = s.address(); s.close(() => resolve(port)); });
    s.on('error', reject);
  });
}

const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.mjs': 'text/javascript; charset=utf-8',
  '.css': 'text/css; charset=utf-8', '.json': 'application/json', '.wasm': 'application/wasm', '.svg': 'image/svg+xml',
  '.png': 'image/png', '.ico': 'image/x-icon', '.woff2': 'font/woff2', '.woff': 'font/woff', '.ttf': 'font/ttf',
  '.mp3': 'audio/mpeg', '.ogg': 'audio/ogg', '.map': 'application/json', '.txt': 'text/plain',
};

/**
 * Serve the host page at /host/ and the app at /<name>/ for each entry of
 * `apps` ({ name: configJson }), with that config.json. On localhost, which
 * browsers treat as a secure context.
 */
export async function startStatic(apps) {
  const server = httpServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    const [, top, ...rest] = path.split('/');
    let root;
    let file = rest.join('/') || 'index.html';
    if (top === 'host') {
      root = here;
      if (!(file === 'host.html' || file.startsWith('build/'))) { res.writeHead(404).end(); return; }
    } else if (apps[top]) {
      if (file === 'config.json') {
        res.writeHead(200, { 'content-type': 'application/json', 'cache-control': 'no-store' });
        res.end(JSON.stringify(apps[top]));
        return;
      }
      root = APP_DIST;
    } else {
      res.writeHead(404).end();
      return;
    }
    const full = normalize(join(root, file));
    if (!full.startsWith(root + sep) || !existsSync(full) || !statSync(full).isFile()) { res.writeHead(404).end(); return; }
    res.writeHead(200, { 'content-type': TYPES[extname(full)] || 'application/octet-stream', 'cache-control': 'max-age=3600' });
    res.end(readFileSync(full));
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const base = `http://localhost:${server.address().port}`;
  return { base, close: () => new Promise((r) => server.close(r)) };
}

function collect(proc, log, max = 2000) {
  const keep = (d) => { log.push(...d.toString().split('\n').filter(Boolean)); if (log.length > max) log.splice(0, log.length - max); };
  proc.stdout?.on('data', keep);
  proc.stderr?.on('data', keep);
}

/**
 * A Synapse with MatrixRTC on, users and an encrypted room (synapse_up.py).
 * `transportUrl`: what /rtc/transports lists (none if empty); `sticky`: MSC4354
 * sticky events on (Element Call's matrix_2_0 mode needs them).
 */
export async function startSynapse({ transportUrl = '', users = ['alice', 'bob', 'carol'], sticky = false } = {}) {
  const dir = mkdtempSync(join(tmpdir(), 'ec-synapse-'));
  const py = join(repo, '.venv', 'bin', 'python');
  const args = [join(here, 'synapse_up.py'), '--dir', dir, '--users', users.join(',')];
  if (transportUrl) args.push('--transport-url', transportUrl);
  if (sticky) args.push('--sticky');
  const proc = spawn(py, args, { cwd: repo, stdio: ['pipe', 'pipe', 'pipe'], env: { ...process.env, PYTHONDONTWRITEBYTECODE: '1' } });
  const log = [];
  let exited = null;
  proc.on('exit', (code) => { exited = code; });
  proc.stderr.on('data', (d) => log.push(d.toString()));
  const info = await new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`synapse_up.py: no JSON within 60 s\n${log.join('')}`)), 60000);
    proc.stdout.on('data', (d) => {
      buf += d.toString();
      const nl = buf.indexOf('\n');
      if (nl >= 0) { clearTimeout(timer); try { resolve(JSON.parse(buf.slice(0, nl))); } catch (e) { reject(e); } }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`synapse_up.py exited with ${code}\n${log.join('')}`)); });
  });
  return {
    ...info,
    log,
    async request(method, path, token, body) {
      const r = await fetch(info.base_url + path, {
        method,
        headers: { authorization: `Bearer ${token}`, ...(body ? { 'content-type': 'application/json' } : {}) },
        body: body ? JSON.stringify(body) : undefined,
      });
      const text = await r.text();
      if (!r.ok) throw new Error(`${method} ${path} -> ${r.status} ${text}`);
      return text ? JSON.parse(text) : {};
    },
    /** The room's current call.member state events (content per state key). */
    async callMembers(token = info.users[Object.keys(info.users)[0]].access_token) {
      const state = await this.request('GET', `/_matrix/client/v3/rooms/${encodeURIComponent(info.room_id)}/state`, token);
      return state.filter((e) => e.type === 'org.matrix.msc3401.call.member')
        .map((e) => ({ stateKey: e.state_key, sender: e.sender, active: Object.keys(e.content || {}).length > 0, content: e.content }));
    },
    async stop() {
      if (exited === null) {
        proc.stdin.end();
        await Promise.race([new Promise((r) => proc.on('exit', r)), sleep(12000)]);
        if (exited === null) proc.kill('SIGKILL');
      }
      if (!process.env.EC_KEEP_TMP) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** config/moselle.toml with the token service on for `synapse`, as tests/python/test_matrix.py sets it up. */
function moselleConfig(synapse, livekitUrl) {
  const text = readFileSync(join(repo, 'config', 'moselle.toml'), 'utf8');
  const matrix = `[matrix]
enabled = true
livekit_url = "${livekitUrl}"
full_access_homeservers = ["localhost"]
denied_homeservers = ["denied.example"]
token_ttl_secs = 600
request_timeout_ms = 2000
membership_recheck_secs = 1
requests_per_minute_per_address = 600
requests_per_minute_per_user = 600
allow_metadata_updates = false

[matrix.homeserver_urls]
localhost = "${synapse.base_url}"

[matrix.membership]
method = "admin_api"
homeserver_url = "${synapse.base_url}"
access_token = "${synapse.admin.access_token}"

`;
  return (text.slice(0, text.indexOf('[matrix]')) + matrix + text.slice(text.indexOf('[cluster]')))
    .replace('auto_create = true', 'auto_create = false');
}

/**
 * A Moselle node on the namespace's address, token service for `synapse`, on `httpPort`.
 * `cluster` ({ nodeId, redisUrl, publicUrl }): one of several nodes sharing Redis,
 * announcing `publicUrl` as its signaling URL (heartbeat 1 s, dropped after 3 s).
 */
export async function startMoselle(synapse, httpPort, cluster = null) {
  const dir = mkdtempSync(join(tmpdir(), 'ec-moselle-'));
  const base = `http://${IP}:${httpPort}`;
  const cfgPath = join(dir, 'moselle.toml');
  let text = moselleConfig(synapse, `ws://${IP}:${httpPort}`);
  if (cluster) {
    text = text.replace('node_id = "moselle-1"', `node_id = "${cluster.nodeId}"`)
      .replace('public_url = ""', `public_url = "${cluster.publicUrl}"`)
      .replace('redis_url = ""', `redis_url = "${cluster.redisUrl}"`)
      .replace('heartbeat_secs = 2', 'heartbeat_secs = 1')
      .replace('node_ttl_secs = 6', 'node_ttl_secs = 3');
    for (const want of [cluster.nodeId, cluster.publicUrl, cluster.redisUrl]) {
      if (!text.includes(want)) throw new Error(`config/moselle.toml changed: could not set ${want}`);
    }
  }
  writeFileSync(cfgPath, text);
  const args = ['serve', '--dev', '--config', cfgPath, '--bind', IP, '--http-port', String(httpPort),
    '--udp-port', String(await freePort(IP, 'udp')), '--tcp-port', String(await freePort(IP))];
  const proc = spawn(moselleBin(), args, { cwd: repo, env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' }, stdio: ['ignore', 'pipe', 'pipe'] });
  const log = [];
  collect(proc, log);
  let exited = null;
  proc.on('exit', (code) => { exited = code; });
  await waitFor('Moselle to answer /healthz', async () => {
    if (exited !== null) throw new Error(`moselle exited with ${exited}:\n${log.join('\n')}`);
    const r = await fetch(`${base}/healthz`).catch(() => null);
    return r && r.status === 200;
  }, 15000, 100);
  return {
    base, log, config: cfgPath, proc,
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
      if (!process.env.EC_KEEP_TMP) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A throwaway redis-server on the namespace's address (Debian redis-server). */
export async function startRedis() {
  if (!existsSync('/usr/bin/redis-server')) throw new Error('missing: /usr/bin/redis-server (Debian redis-server)');
  const port = await freePort(IP);
  const proc = spawn('/usr/bin/redis-server', // Protected mode would refuse clients on the namespace address; nothing
    // outside the namespace can reach it.
    ['--bind', IP, '--port', String(port), '--save', '', '--appendonly', 'no', '--protected-mode', 'no'],
    { stdio: ['ignore', 'pipe', 'pipe'] });
  const log = [];
  collect(proc, log);
  await waitFor('redis-server to accept connections', () => new Promise((resolve) => {
    const c = netConnect(port, IP, () => { c.end(); resolve(true); });
    c.on('error', () => resolve(false));
  }), 10000, 100);
  return {
    url: `redis://${IP}:${port}`,
    stop: () => { proc.kill('SIGKILL'); },
  };
}

/**
 * A failover TCP front for one node's URL, as a provider's load balancer or
 * floating address gives it: each new connection goes to the first of
 * `ports` that accepts it (the node itself, then its standby). Counts the
 * connections each port took.
 */
export async function startFailoverFront(ports) {
  const listen = await freePort(IP);
  const taken = Object.fromEntries(ports.map((p) => [p, 0]));
  const sockets = new Set();
  const server = netServer((client) => {
    sockets.add(client);
    client.on('close', () => sockets.delete(client));
    client.on('error', () => {});
    client.pause();
    const attempt = (i) => {
      if (i >= ports.length) { client.destroy(); return; }
      const up = netConnect(ports[i], IP);
      up.once('error', () => { up.destroy(); attempt(i + 1); });
      up.once('connect', () => {
        taken[ports[i]]++;
        up.removeAllListeners('error');
        up.on('error', () => client.destroy());
        client.on('error', () => up.destroy());
        up.on('close', () => client.destroy());
        client.on('close', () => up.destroy());
        sockets.add(up);
        up.on('close', () => sockets.delete(up));
        client.pipe(up);
        up.pipe(client);
        client.resume();
      });
    };
    attempt(0);
  });
  await new Promise((resolve, reject) => { server.once('error', reject); server.listen(listen, IP, resolve); });
  return {
    port: listen, taken,
    close: () => new Promise((resolve) => { for (const s of sockets) s.destroy(); server.close(() => resolve()); }),
  };
}

/** A 440 Hz tone as a WAV file for Chromium's fake microphone (a continuous speaker). */
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

export async function launchBrowser() {
  const { chromium } = require('playwright-core');
  mkdirSync(OUT, { recursive: true });
  const before = new Set(childrenOf(process.pid));
  const browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-quic',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--allow-loopback-in-peer-connection', '--autoplay-policy=no-user-gesture-required',
      `--use-file-for-fake-audio-capture=${toneWav(join(OUT, 'tone-440.wav'))}`,
    ],
  });
  // Its main process: the child of ours that was not there before (Playwright
  // gives no handle to it), for killBrowser().
  const fresh = childrenOf(process.pid).filter((p) => !before.has(p) && /chrom/.test(exeOf(p)));
  browser.pid = fresh.length === 1 ? fresh[0] : undefined;
  browser.pidsFound = fresh;
  return browser;
}

// Runs in every frame before its scripts: keeps the page's peer connections
// (livekit-client's) so the test can read their stats, and which of their
// receivers got an end-to-end-encryption transform.
const INIT = () => {
  const Orig = window.RTCPeerConnection;
  if (!Orig || Orig.__moselleWrapped) return;
  const list = [];
  window.__pcs = list;
  class PC extends Orig {
    constructor(config, ...rest) {
      super(config, ...rest);
      this.__config = config || {};
      list.push(this);
    }
  }
  PC.__moselleWrapped = true;
  window.RTCPeerConnection = PC;
  window.webkitRTCPeerConnection = PC;
  // The LiveKit signaling (protobuf over a WebSocket to .../rtc): which
  // remote participants the app's LiveKit client knows, and when the SFU
  // told it one left (ParticipantUpdate with state DISCONNECTED).
  const lk = (window.__lk = { sockets: 0, messages: 0, participants: {}, errors: 0 });
  const varint = (b, p) => {
    let v = 0; let m = 1;
    for (;;) { const x = b[p.i++]; v += (x & 0x7f) * m; if (x < 0x80) return v; m *= 128; }
  };
  const fields = (b) => {
    const out = []; const p = { i: 0 };
    while (p.i < b.length) {
      const key = varint(b, p); const f = Math.floor(key / 8); const w = key & 7;
      if (w === 0) out.push([f, varint(b, p)]);
      else if (w === 2) { const n = varint(b, p); out.push([f, b.subarray(p.i, p.i + n)]); p.i += n; }
      else if (w === 1) p.i += 8;
      else if (w === 5) p.i += 4;
      else throw new Error(`wire type ${w}`);
    }
    return out;
  };
  const text = (b) => new TextDecoder().decode(b);
  // ParticipantInfo: sid = 1, identity = 2, state = 3 (JOINING 0, JOINED 1,
  // ACTIVE 2, DISCONNECTED 3). Per identity, the state of each of its
  // participants (Element Call may connect twice with one identity); it is
  // gone (disconnectedAt) when all of them are DISCONNECTED.
  const info = (b, how) => {
    let sid = ''; let identity = ''; let state = 0;
    for (const [f, v] of fields(b)) { if (f === 1) sid = text(v); if (f === 2) identity = text(v); if (f === 3) state = v; }
    if (!identity) return;
    const at = Date.now();
    const e = (lk.participants[identity] ||= { firstSeen: at, via: how, sids: {}, history: [] });
    e.sids[sid] = state; e.state = state; e.last = at;
    if (e.history.length < 40) e.history.push([sid, state, at]);
    if (Object.values(e.sids).every((st) => st === 3)) { if (e.disconnectedAt === undefined) e.disconnectedAt = at; } else delete e.disconnectedAt;
  };
  const onSignal = (buf) => {
    lk.messages++;
    // SignalResponse: join = 1 (JoinResponse: other_participants = 3), update = 5 (ParticipantUpdate: participants = 1).
    for (const [f, v] of fields(new Uint8Array(buf))) {
      if (f === 1 && typeof v !== 'number') for (const [g, w] of fields(v)) { if (g === 3) info(w, 'join'); }
      if (f === 5 && typeof v !== 'number') for (const [g, w] of fields(v)) { if (g === 1) info(w, 'update'); }
    }
  };
  const OrigWS = window.WebSocket;
  if (OrigWS) {
    window.WebSocket = class extends OrigWS {
      constructor(url, ...rest) {
        super(url, ...rest);
        if (!/\/rtc/.test(String(url))) return;
        lk.sockets++;
        this.addEventListener('message', (ev) => {
          const d = ev.data;
          const go = (buf) => { try { onSignal(buf); } catch { lk.errors++; } };
          if (d instanceof ArrayBuffer) go(d);
          else if (d && typeof d.arrayBuffer === 'function') d.arrayBuffer().then(go);
        });
      }
    };
  }
  // Frame transforms (livekit-client's E2EE worker encrypts/decrypts every
  // frame through them): count the senders and receivers that got one.
  const e2ee = (window.__e2ee = { senders: 0, receivers: 0 });
  for (const [Cls, key] of [[window.RTCRtpSender, 'senders'], [window.RTCRtpReceiver, 'receivers']]) {
    if (!Cls) continue;
    const orig = Cls.prototype.createEncodedStreams;
    if (orig) {
      Cls.prototype.createEncodedStreams = function (...a) { e2ee[key]++; return orig.apply(this, a); };
    }
    const d = Object.getOwnPropertyDescriptor(Cls.prototype, 'transform');
    if (d && d.set) {
      Object.defineProperty(Cls.prototype, 'transform', {
        configurable: true, enumerable: d.enumerable, get: d.get,
        set(v) { if (v) e2ee[key]++; return d.set.call(this, v); },
      });
    }
  }
};

// Evaluated in the app's frame: what its peer connections receive.
const INBOUND = async () => {
  const out = { video: [], audio: [], receivers: 0, insertableStreams: false, e2ee: window.__e2ee || null };
  for (const pc of window.__pcs || []) {
    if (pc.connectionState === 'closed') continue;
    if (pc.__config.encodedInsertableStreams) out.insertableStreams = true;
    for (const r of pc.getReceivers()) {
      if (!r.track || r.track.readyState !== 'live') continue;
      out.receivers++;
    }
    const stats = await pc.getStats();
    stats.forEach((s) => {
      if (s.type !== 'inbound-rtp') return;
      if (s.kind === 'video') {
        out.video.push({ id: s.trackIdentifier, mid: s.mid, framesDecoded: s.framesDecoded || 0, width: s.frameWidth || 0,
          height: s.frameHeight || 0, packets: s.packetsReceived || 0, bytes: s.bytesReceived || 0,
          keyFramesDecoded: s.keyFramesDecoded || 0, framesReceived: s.framesReceived || 0, pli: s.pliCount || 0, fir: s.firCount || 0 });
      } else if (s.kind === 'audio') {
        out.audio.push({ id: s.trackIdentifier, mid: s.mid, packets: s.packetsReceived || 0, energy: s.totalAudioEnergy || 0,
          samples: s.totalSamplesReceived || 0, concealed: s.concealedSamples || 0 });
      }
    });
  }
  // Which participant each playing video element shows (tile labels).
  out.tiles = [...document.querySelectorAll('video')].map((v) => {
    const t = v.srcObject?.getVideoTracks?.()[0];
    let el = v;
    let label = '';
    for (let i = 0; i < 8 && el && !label; i++) { el = el.parentElement; label = el?.getAttribute?.('aria-label') || ''; }
    return { track: t?.id || null, label: label || (v.closest('[data-testid]')?.textContent || '').slice(0, 60), playing: !v.paused };
  });
  return out;
};

/**
 * One Matrix user in their own browser context: our host page, logged in,
 * embedding the app from `appBase` with the given intent.
 */
export async function openUser(browser, { statics, app, synapse, name, intent, params = {}, hold = false }) {
  const context = await browser.newContext({ viewport: { width: 1024, height: 700 } });
  await context.addInitScript(INIT);
  const page = await context.newPage();
  const log = [];
  page.on('console', (m) => {
    if (m.type() === 'debug') return;
    const text = m.text();
    if (/FetchHttpApi|matrix_sdk_crypto|\[Perf\]/.test(text)) return;
    log.push(`[${m.type()}] ${text.slice(0, 600)}`);
    if (log.length > 3000) log.splice(0, 1000);
  });
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.stack || e}`));
  // HTTP failures with their URLs (the console's "Failed to load resource" has none).
  page.on('response', (r) => {
    if (r.status() >= 400) log.push(`[http] ${r.status()} ${r.request().method()} ${r.url().replace(/access_token=[^&]+/, 'access_token=…')}`);
  });
  page.on('requestfailed', (r) => log.push(`[http] failed ${r.request ? '' : ''}${r.method()} ${r.url()}: ${r.failure()?.errorText}`));
  // The app's calls to the token service: which endpoint, whether it
  // delegated its delayed leave (delay_id present; the id itself is a secret
  // and not kept), the answer and the LiveKit identity and room in the JWT.
  const tokenCalls = [];
  page.on('request', (r) => {
    const url = new URL(r.url());
    const m = /\/(sfu\/get|get_token|delegate_delayed_leave)$/.exec(url.pathname);
    if (!m || r.method() !== 'POST') return;
    let body = {};
    try { body = JSON.parse(r.postData() || '{}'); } catch { body = {}; }
    const call = { endpoint: m[1], url: url.origin + url.pathname, at: Date.now(), delegated: !!body.delay_id, delay_timeout: body.delay_timeout,
      delay_cs_api_url: body.delay_cs_api_url, member: body.member ? { ...body.member } : undefined };
    tokenCalls.push(call);
    r.response().then(async (res) => {
      call.status = res?.status();
      if (call.status === 200 && m[1] !== 'delegate_delayed_leave') {
        const { jwt } = await res.json();
        const p = JSON.parse(Buffer.from(jwt.split('.')[1], 'base64').toString());
        call.sub = p.sub;
        call.room = p.video?.room;
      }
    }).catch((e) => { call.error = String(e); });
  });
  const u = synapse.users[name];
  const q = new URLSearchParams({
    hs: synapse.base_url, user: u.user_id, token: u.access_token, device: u.device_id, room: synapse.room_id,
    app: `${statics.base}/${app}/`, intent, params: JSON.stringify(params), ...(hold ? { hold: '1' } : {}),
  });
  const startedAt = Date.now();
  await page.goto(`${statics.base}/host/host.html?${q}`);
  const user = {
    name, context, page, log, startedAt, tokenCalls, userId: u.user_id, deviceId: u.device_id,
    frame: () => page.frame({ name: 'element-call' }),
    host: () => page.evaluate(() => {
      const h = window.host;
      return { state: h.state, times: h.times, toDeviceSent: h.toDeviceSent, toDeviceReceived: h.toDeviceReceived,
        keysLog: h.keysLog, actions: h.actions.map((a) => a.action), capabilities: h.capabilities.length,
        transportsAsked: h.transportsAsked, transports: h.transports, delayed: h.delayed, sent: h.sent, errors: h.errors,
        memberLog: h.memberLog, stickyRead: h.stickyRead || 0, undecryptable: h.undecryptable };
    }),
    /** What the app's LiveKit client was told about remote participants (window.__lk). */
    async lk() {
      const f = user.frame();
      return f ? f.evaluate(() => window.__lk || null) : null;
    },
    async inbound() {
      const f = user.frame();
      if (!f) return null;
      return f.evaluate(INBOUND);
    },
    async close() { await context.close().catch(() => {}); },
  };
  return user;
}

function exeOf(pid) {
  try { return readlinkSync(`/proc/${pid}/exe`); } catch { return ''; }
}

function childrenOf(pid) {
  return (processMap().get(pid) || []);
}

/** ppid -> child pids, from /proc. */
function processMap() {
  const children = new Map();
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (!children.has(ppid)) children.set(ppid, []);
      children.get(ppid).push(Number(d));
    } catch { /* gone */ }
  }
  return children;
}

/** The pids of `pid` and all its descendants (from /proc). */
function processTree(pid) {
  const children = processMap();
  const out = [pid];
  for (let i = 0; i < out.length; i++) out.push(...(children.get(out[i]) || []));
  return out;
}

const alive = (pid) => { try { process.kill(pid, 0); return true; } catch { return false; } };

/**
 * kill -9 a browser launched by launchBrowser(): its whole process tree
 * (browser, zygotes, renderers, GPU/network/audio services) at once, no
 * goodbye. Returns when (epoch ms) it was killed and the pids.
 */
export async function killBrowser(browser) {
  const pid = browser.pid;
  if (!pid) throw new Error(`no browser process to kill (new child processes at launch: ${JSON.stringify(browser.pidsFound)})`);
  const pids = processTree(pid);
  const at = Date.now();
  try { process.kill(-pid, 'SIGKILL'); } catch { /* not a group leader */ }
  for (const p of pids) { try { process.kill(p, 'SIGKILL'); } catch { /* already gone */ } }
  await waitFor('the killed browser\'s processes to be gone', () => pids.every((p) => !alive(p) || isZombie(p)), 5000, 50);
  return { at, pids };
}

function isZombie(pid) {
  try { return / Z /.test(readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\)/, '')); } catch { return true; }
}

/** Remote videos being decoded now: per track, frames decoded over `ms`. */
export async function decodingOver(user, ms = 1500) {
  const a = await user.inbound();
  await sleep(ms);
  const b = await user.inbound();
  const before = new Map((a?.video || []).map((v) => [v.id, v]));
  const video = (b?.video || []).map((v) => ({ ...v, delta: v.framesDecoded - (before.get(v.id)?.framesDecoded || 0) }));
  const beforeA = new Map((a?.audio || []).map((v) => [v.id, v]));
  const audio = (b?.audio || []).map((v) => ({ ...v, dPackets: v.packets - (beforeA.get(v.id)?.packets || 0),
    dEnergy: v.energy - (beforeA.get(v.id)?.energy || 0) }));
  return {
    video, audio, tiles: b?.tiles || [], e2ee: b?.e2ee || null, receivers: b?.receivers || 0,
    insertableStreams: !!b?.insertableStreams,
    decodingVideos: video.filter((v) => v.delta > 0 && v.width > 0).length,
    hearingAudios: audio.filter((v) => v.dPackets > 0 && v.dEnergy > 0).length,
  };
}
