// TURN over TLS in the network lab (tests/netlab.sh): coturn in the server
// namespace, started from the config we ship (config/coturn.conf, its
// CHANGE-ME placeholders filled in), tinyproxy in the proxy namespace, a
// Moselle config with a [[turn]] entry, and a Chromium that reaches the
// network only through the proxy. Used by turn.test.mjs.
//
// What the proxy allows (tinyproxy, our own config): clients from the
// client's address only; requests for the host 198.18.0.1 (the server) only
// (Filter + FilterDefaultDeny); CONNECT only to port 443 (coturn's TURN/TLS)
// and to Moselle's HTTP port (the signaling WebSocket: Chromium tunnels ws://
// through CONNECT). The call page itself is fetched with plain proxied GETs.
// CONNECT to the ICE-TCP port is refused, so the relay is the only media path.
import { spawn, execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { randomBytes } from 'node:crypto';
import { chmodSync, chownSync, existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repo, waitFor } from '../browser/harness.mjs';
import { PORTS, PROXY_PORT } from './netlab.mjs';

export const TURN_PORT = 443;

/** A fresh directory for one run's configs, keys and logs. World-readable:
 * coturn (proc-user turnserver) and tinyproxy (User tinyproxy) drop root. */
export function workDir() {
  const dir = mkdtempSync(join(tmpdir(), 'moselle-turn-lab-'));
  chmodSync(dir, 0o755);
  return dir;
}

const inNs = (ns, cmd, args, opts = {}) => execFileSync('ip', ['netns', 'exec', ns, cmd, ...args], { encoding: 'utf8', ...opts });

const listening = (ns, ip, port) => inNs(ns, 'ss', ['-Hltn', `src ${ip}:${port}`]).trim() !== '';

/** A daemon in a namespace, in the foreground; its stdout/stderr kept. */
function daemon(ns, argv) {
  const out = [];
  const proc = spawn('ip', ['netns', 'exec', ns, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
  const keep = (d) => out.push(...d.toString().split('\n').filter(Boolean));
  proc.stdout.on('data', keep);
  proc.stderr.on('data', keep);
  let exited = null;
  proc.on('exit', (code, sig) => { exited = code ?? sig; });
  return {
    proc,
    out,
    exited: () => exited,
    async stop() {
      if (exited !== null) return;
      proc.kill('SIGTERM');
      const gone = new Promise((r) => proc.on('exit', r));
      await Promise.race([gone, new Promise((r) => setTimeout(r, 3000))]);
      if (exited === null) proc.kill('SIGKILL');
    },
  };
}

const tail = (path, n = 40) => (existsSync(path) ? readFileSync(path, 'utf8').split('\n').slice(-n).join('\n') : `<no ${path}>`);

/**
 * config/coturn.conf as the test runs it. Placeholders: listening-ip,
 * relay-ip, allowed-peer-ip = the server's address, static-auth-secret =
 * `secret`, cert/pkey = a self-signed P-256 pair. Adapted for a test (each
 * reported in `changes`): `syslog` becomes a log file of our own
 * (`log-file`, `simple-log`: no date in its name) and `pid-file` (the
 * default /var/run/turnserver.pid is shared by every coturn on the machine).
 * Everything else, proc-user/proc-group included, stays as shipped. Throws
 * if the shipped file no longer has the lines this expects.
 */
export function coturnConfig(l, dir, secret) {
  const shipped = readFileSync(join(repo, 'config', 'coturn.conf'), 'utf8');
  const paths = { cert: join(dir, 'turn-cert.pem'), pkey: join(dir, 'turn-key.pem'), log: join(dir, 'turnserver.log'), pid: join(dir, 'turnserver.pid') };
  const set = {
    'listening-ip': l.serverIp, 'relay-ip': l.serverIp, 'allowed-peer-ip': l.serverIp,
    'static-auth-secret': secret, cert: paths.cert, pkey: paths.pkey, realm: 'turn.test',
  };
  // `verbose`: coturn logs sessions, allocations and their usage only then.
  const replace = { syslog: [`log-file=${paths.log}`, 'simple-log', 'verbose', `pid-file=${paths.pid}`] };
  const seen = new Set();
  const changes = [];
  const lines = shipped.split('\n').flatMap((line) => {
    const key = line.split('=')[0].trim();
    if (line.startsWith('#') || !(key in set || key in replace)) return [line];
    if (seen.has(key)) throw new Error(`config/coturn.conf: ${key} appears twice; this test expects it once`);
    seen.add(key);
    const now = key in set ? [`${key}=${set[key]}`] : replace[key];
    changes.push(`${line} -> ${now.join(', ')}`);
    return now;
  });
  const missing = [...Object.keys(set), ...Object.keys(replace)].filter((k) => !seen.has(k));
  if (missing.length) throw new Error(`config/coturn.conf has no ${missing.join(', ')} line any more; update tests/browser-lab/relay.mjs`);
  const text = lines.join('\n');
  const left = text.split('\n').filter((x) => !x.startsWith('#') && x.includes('CHANGE-ME'));
  if (left.length) throw new Error(`config/coturn.conf: placeholders this test does not fill: ${left.join(' | ')}`);
  return { text, changes, paths };
}

/** coturn (Debian's turnserver) in the server namespace on our config;
 * resolves once it listens on TURN_PORT. The secret is also written to
 * `secretFile` (Moselle's [[turn]] secret_file). */
export async function startCoturn(l, dir) {
  const secret = randomBytes(32).toString('hex');
  const cfg = coturnConfig(l, dir, secret);
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-subj', '/CN=turn.test', '-days', '1', '-keyout', cfg.paths.pkey, '-out', cfg.paths.cert], { stdio: 'ignore' });
  chmodSync(cfg.paths.pkey, 0o644); // a throwaway test key; coturn re-reads it as turnserver
  const secretFile = join(dir, 'turn-secret');
  writeFileSync(secretFile, `${secret}\n`, { mode: 0o600 });
  const conf = join(dir, 'turnserver.conf');
  writeFileSync(conf, cfg.text);
  const d = daemon(l.nsServer, ['turnserver', '-c', conf]);
  const log = () => tail(cfg.paths.log, 1e9);
  await waitFor(`coturn to listen on ${l.serverIp}:${TURN_PORT}`, () => {
    if (d.exited() !== null) throw new Error(`turnserver exited with ${d.exited()}: ${d.out.join('\n')}\n${tail(cfg.paths.log)}`);
    return listening(l.nsServer, l.serverIp, TURN_PORT);
  }, 10000, 100);
  return { ...d, conf, secretFile, changes: cfg.changes, logPath: cfg.paths.log, log, logTail: (n) => tail(cfg.paths.log, n) };
}

/**
 * What coturn's log `text` (verbose; the whole log or the part since a test
 * began) says happened: TURN sessions opened (their usernames, i.e.
 * `<expiry>:<participant sid>`, and TLS versions), successful allocations,
 * permissions and channel binds, and, summed over the sessions that ended,
 * their traffic with the peer (Moselle): rp/rb packets and bytes received
 * from it, sp/sb sent to it.
 */
export function coturnActivity(text) {
  const lines = text.split('\n');
  const count = (re) => lines.filter((x) => re.test(x)).length;
  const usernames = [];
  const methods = new Set();
  const peer = { rp: 0, rb: 0, sp: 0, sb: 0 };
  let ended = 0;
  for (const x of lines) {
    let m = /session \d+: new, realm=<[^>]*>, username=<([^>]*)>.*method=(\S+)/.exec(x);
    if (m) { usernames.push(m[1]); methods.add(m[2]); }
    m = /peer usage: .*rp=(\d+), rb=(\d+), sp=(\d+), sb=(\d+)/.exec(x);
    if (m) {
      ended += 1;
      ['rp', 'rb', 'sp', 'sb'].forEach((k, i) => { peer[k] += Number(m[i + 1]); });
    }
  }
  return {
    usernames,
    methods: [...methods],
    allocations: count(/ALLOCATE processed, success/),
    permissions: count(/CREATE_PERMISSION processed, success/),
    channelBinds: count(/CHANNEL_BIND processed, success/),
    ended,
    peer,
  };
}

export const describeCoturn = (t) => `${t.usernames.length} sessions (${t.methods.join(', ') || 'no TLS'}; users ${t.usernames.join(', ') || '-'}), `
  + `${t.allocations} allocations, ${t.permissions} permissions, ${t.channelBinds} channel binds; ${t.ended} ended, their traffic with Moselle: `
  + `received ${t.peer.rp} packets / ${t.peer.rb} B, sent ${t.peer.sp} packets / ${t.peer.sb} B`;

/** tinyproxy in the proxy namespace (see the top of this file); resolves
 * once it listens. `connectPorts`: the ports CONNECT may reach. */
export async function startTinyproxy(l, dir, connectPorts) {
  const log = join(dir, 'tinyproxy.log');
  const filter = join(dir, 'tinyproxy.filter');
  writeFileSync(filter, `^${l.serverIp.replaceAll('.', '\\.')}$\n`);
  writeFileSync(log, '');
  // It writes its log as the unprivileged user it switches to.
  const [uid, gid] = ['-u', '-g'].map((f) => Number(execFileSync('id', [f, 'tinyproxy'], { encoding: 'utf8' })));
  chownSync(log, uid, gid);
  const conf = join(dir, 'tinyproxy.conf');
  writeFileSync(conf, [
    'User tinyproxy', 'Group tinyproxy',
    `Listen ${l.proxyIp}`, `Port ${PROXY_PORT}`,
    `Allow ${l.clientIp}`,
    ...connectPorts.map((p) => `ConnectPort ${p}`),
    `Filter "${filter}"`, 'FilterDefaultDeny Yes',
    'Timeout 600', 'MaxClients 100', 'DisableViaHeader Yes',
    `LogFile "${log}"`, 'LogLevel Info', `PidFile "${join(dir, 'tinyproxy.pid')}"`,
    '',
  ].join('\n'));
  const d = daemon(l.nsProxy, ['tinyproxy', '-d', '-c', conf]);
  await waitFor(`tinyproxy to listen on ${l.proxyIp}:${PROXY_PORT}`, () => {
    if (d.exited() !== null) throw new Error(`tinyproxy exited with ${d.exited()}: ${d.out.join('\n')}\n${tail(log)}`);
    return listening(l.nsProxy, l.proxyIp, PROXY_PORT);
  }, 10000, 100);
  return { ...d, conf, logPath: log, log: () => tail(log, 1e9), logTail: (n) => tail(log, n) };
}

/** What tinyproxy's log `text` shows: CONNECT requests to `serverIp` per
 * port, those refused per port (not a ConnectPort), requests refused by the
 * filter (another host: Chromium's own background requests), plain GET/POST
 * requests. */
export function proxyActivity(text, serverIp) {
  const connect = {};
  const refused = {};
  let filtered = 0;
  let plain = 0;
  for (const x of text.split('\n')) {
    let m = /Request \(file descriptor \d+\): CONNECT ([^ ]*):(\d+) /.exec(x);
    if (m && m[1] === serverIp) connect[m[2]] = (connect[m[2]] || 0) + 1;
    m = /Refused CONNECT method on port (\d+)/.exec(x);
    if (m) refused[m[1]] = (refused[m[1]] || 0) + 1;
    if (/Proxying refused on filtered domain/.test(x)) filtered += 1;
    if (/Request \(file descriptor \d+\): (GET|POST) /.test(x)) plain += 1;
  }
  return { connect, refused, filtered, plain };
}

export const describeProxy = (a) => `CONNECT requests to the server per port ${JSON.stringify(a.connect)}, refused per port ${JSON.stringify(a.refused)}, `
  + `${a.filtered} refused for another host, ${a.plain} GET/POST`;

/** A full Moselle config (the embedded default, config/moselle.toml, plus
 * one [[turn]] entry: coturn's turns: URL, jurisdiction LU). */
export function moselleConfigWithTurn(l, dir, secretFile) {
  const path = join(dir, 'moselle.toml');
  writeFileSync(path, `${readFileSync(join(repo, 'config', 'moselle.toml'), 'utf8')}
[[turn]]
urls = ["turns:${l.serverIp}:${TURN_PORT}?transport=tcp"]
secret_file = ${JSON.stringify(secretFile)}
jurisdiction = "LU"
`);
  return path;
}

/** A Moselle metric read inside the server namespace (the client's
 * firewall lets nothing reach the server directly). */
export function serverMetric(l, name) {
  const text = inNs(l.nsServer, 'curl', ['-sf', '--max-time', '5', `http://${l.serverIp}:${PORTS.http}/metrics`]);
  const line = text.split('\n').find((x) => x.startsWith(`moselle_${name} `));
  if (!line) throw new Error(`metric moselle_${name} not exported`);
  return Number(line.split(' ')[1]);
}

/**
 * Debian's Chromium as tests/browser/harness.mjs launches it, but through
 * the HTTP proxy (pages, the signaling WebSocket, and WebRTC's TCP: TURN/TLS
 * and ICE-TCP go through CONNECT), with the WebRTC policy against UDP the
 * proxy does not carry, and the self-signed TURN certificate accepted.
 * The policy does not stop Chromium 156 from gathering a host UDP candidate
 * (measured: the same candidates with and without it); the firewall then
 * drops that UDP.
 */
export function launchProxiedBrowser(l) {
  const { chromium } = createRequire(import.meta.url)(join(repo, 'web', 'node_modules', 'playwright-core'));
  const base = `http://${l.serverIp}:${PORTS.http}`;
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
      '--disable-sync', '--no-first-run', '--disable-quic',
      '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
      '--autoplay-policy=no-user-gesture-required',
      `--unsafely-treat-insecure-origin-as-secure=${base}`,
      `--proxy-server=http://${l.proxyIp}:${PROXY_PORT}`,
      '--force-webrtc-ip-handling-policy=disable_non_proxied_udp',
      '--ignore-certificate-errors',
    ],
  });
}
