// The network lab for the browser connectivity tests: tests/netlab.sh's
// namespaces, a Moselle server in the server namespace, and nftables rules
// in the client namespace, where node and its Chromium run. The same lab and
// rules as tests/connectivity/netlab.py (the Python side).
//
//   MOSELLE_BIN=target/debug/moselle tests/netlab.sh node --test tests/browser-lab/
//
// Firewall: table `inet moselle_lab` in the client namespace, output chain
// `policy drop`: loopback always allowed, then UDP (see the cases), then
// established/related and TCP to the server (signaling, ICE-TCP). Two ways to
// block UDP: 'udp-blocked', the client's own output chain drops it (before
// the conntrack rule, so no flow left from an earlier case gets through), as
// a host firewall does, and the sender gets EPERM at once; 'udp-blackholed',
// the client may send UDP but the bridge (table `bridge moselle_path` in the
// hub namespace) drops its UDP frames silently, as a network firewall does.
// Counters (packets), in the client's table and, for 'udp-blackholed', the
// hub's (prefixed path_): udp_dropped (every UDP packet dropped),
// udp_dropped_to_server (the part addressed to the server: its ICE checks),
// other_dropped (the rest).
// 'proxy-only' (the TURN cases, relay.mjs): the client reaches nothing but
// the HTTP proxy (TCP to PROXY_PORT on the proxy's address): UDP is dropped
// as in 'udp-blocked', and so is all direct TCP to the server; connection
// attempts (SYNs) are counted apart: tcp_syn_to_ice_tcp (to the server's
// ICE-TCP port), tcp_syn_to_server (to any other port of it).
import { execFileSync } from 'node:child_process';
import { startServer } from '../browser/harness.mjs';

const TABLE = 'moselle_lab'; // inet, client namespace
const PATH_TABLE = 'moselle_path'; // bridge, hub namespace
const COUNTERS = ['udp_dropped', 'udp_dropped_to_server', 'other_dropped'];
const PROXY_ONLY_COUNTERS = [...COUNTERS, 'tcp_syn_to_ice_tcp', 'tcp_syn_to_server'];
// Fixed ports: this namespace cannot probe the server's for free ones.
export const PORTS = { http: 17880, tcp: 17881, udp: 17882 };
// The HTTP proxy's port on the proxy's address (relay.mjs starts tinyproxy there).
export const PROXY_PORT = 8888;

/** The lab tests/netlab.sh made; throws outside it. */
export function lab() {
  const names = ['MOSELLE_NS_SERVER', 'MOSELLE_NS_CLIENT', 'MOSELLE_NS_PROXY', 'MOSELLE_NS_HUB', 'MOSELLE_SERVER_IP', 'MOSELLE_CLIENT_IP', 'MOSELLE_PROXY_IP'];
  const missing = names.filter((n) => !process.env[n]);
  if (missing.length) {
    throw new Error(`not inside tests/netlab.sh (unset: ${missing.join(', ')}); run \`tests/netlab.sh node --test tests/browser-lab/\``);
  }
  const e = process.env;
  return { nsServer: e.MOSELLE_NS_SERVER, nsClient: e.MOSELLE_NS_CLIENT, nsProxy: e.MOSELLE_NS_PROXY, nsHub: e.MOSELLE_NS_HUB,
           serverIp: e.MOSELLE_SERVER_IP, clientIp: e.MOSELLE_CLIENT_IP, proxyIp: e.MOSELLE_PROXY_IP };
}

/** `moselle serve --dev` in the server namespace on the server's address and
 * PORTS (ICE-TCP on PORTS.tcp), plus `args` (e.g. `--config FILE`).
 * MOSELLE_LAB_SERVER_ARGS adds arguments (e.g. `--no-ice-tcp` to watch the
 * TCP-only cases fail). */
export function startLabServer(l, args = []) {
  process.env.NO_COLOR ??= '1'; // plain server log lines in failure messages
  const extra = (process.env.MOSELLE_LAB_SERVER_ARGS || '').split(/\s+/).filter(Boolean);
  return startServer(['--tcp-port', String(PORTS.tcp), ...args, ...extra],
    { host: l.serverIp, ports: { http: PORTS.http, udp: PORTS.udp }, netns: l.nsServer });
}

const nft = (args, input, netns = null) => execFileSync(netns ? 'ip' : 'nft', netns ? ['netns', 'exec', netns, 'nft', ...args] : args,
  { input, encoding: 'utf8', stdio: ['pipe', 'pipe', 'pipe'] });

const table = (family, name, hook, policy, rules, counters = COUNTERS) => [
  `table ${family} ${name} {`,
  ...counters.map((c) => `  counter ${c} { }`),
  `  chain ${hook} {`,
  `    type filter hook ${hook} priority filter; policy ${policy};`,
  ...rules.map((r) => `    ${r}`),
  '  }',
  '}',
  '',
].join('\n');

const udpDrop = (serverIp) => [
  `meta l4proto udp counter name "udp_dropped" ip daddr ${serverIp} counter name "udp_dropped_to_server" drop`,
  'meta l4proto udp drop',
];

const KINDS = ['udp-blocked', 'udp-blackholed', 'udp-allowed', 'proxy-only'];

function removeTables(l) {
  try { nft(['delete', 'table', 'inet', TABLE]); } catch { /* not there */ }
  try { nft(['delete', 'table', 'bridge', PATH_TABLE], undefined, l.nsHub); } catch { /* not there */ }
}

/**
 * Install the filters for one case (see the top of this file); returns
 * { kind, counters(), udpDroppedToServer(), report(), remove() }.
 */
export function firewall(l, kind) {
  if (!KINDS.includes(kind)) throw new Error(`unknown firewall case ${kind}`);
  const s = l.serverIp;
  removeTables(l); // left over from an interrupted run
  if (kind === 'proxy-only') {
    nft(['-f', '-'], table('inet', TABLE, 'output', 'drop', [
      'oif "lo" accept', ...udpDrop(s),
      `ip daddr ${s} tcp dport ${PORTS.tcp} tcp flags & (syn | ack) == syn counter name "tcp_syn_to_ice_tcp" drop`,
      `ip daddr ${s} tcp flags & (syn | ack) == syn counter name "tcp_syn_to_server" drop`,
      // The rest of connections opened before these rules (the test runner's
      // keep-alive connection that polled /healthz) ends here too, uncounted.
      `ip daddr ${s} meta l4proto tcp drop`,
      'ct state established,related accept', `ip daddr ${l.proxyIp} tcp dport ${PROXY_PORT} accept`,
      'counter name "other_dropped"',
    ], PROXY_ONLY_COUNTERS));
  } else {
    const udp = kind === 'udp-blocked' ? udpDrop(s) : [`ip daddr ${s} meta l4proto udp accept`];
    nft(['-f', '-'], table('inet', TABLE, 'output', 'drop', [
      'oif "lo" accept', ...udp, 'ct state established,related accept', `ip daddr ${s} meta l4proto tcp accept`,
      'counter name "other_dropped"',
    ]));
  }
  if (kind === 'udp-blackholed') {
    nft(['-f', '-'], table('bridge', PATH_TABLE, 'forward', 'accept', udpDrop(s).map((r) => `iifname "v-client" ${r}`)), l.nsHub);
  }
  const read = (family, name, netns, prefix) => Object.fromEntries(
    JSON.parse(nft(['-j', 'list', 'counters', 'table', family, name], undefined, netns)).nftables
      .filter((o) => o.counter).map((o) => [prefix + o.counter.name, o.counter.packets]));
  const counters = () => ({
    ...read('inet', TABLE, null, ''),
    ...(kind === 'udp-blackholed' ? read('bridge', PATH_TABLE, l.nsHub, 'path_') : {}),
  });
  return {
    kind,
    counters,
    /** UDP packets to the server this case's rules dropped, wherever they did. */
    udpDroppedToServer() {
      const c = counters();
      return (c.udp_dropped_to_server || 0) + (c.path_udp_dropped_to_server || 0);
    },
    report() {
      try {
        return `${Object.entries(counters()).map(([k, v]) => `${k} ${v}`).join(', ')} packets`;
      } catch (e) {
        return `<cannot read nft counters: ${e.message}>`;
      }
    },
    remove: () => removeTables(l),
  };
}

/**
 * The selected ICE candidate pair of the page's publisher connection (its
 * camera sender's stats) and subscriber connection (the receiver of `from`'s
 * video): the transport's selectedCandidatePairId, else a nominated,
 * succeeded pair, with both candidates' protocol and type.
 */
export async function selectedPairs(p, from) {
  return p.page.evaluate(async (from) => {
    const room = window.moselleCall.room;
    const pick = (report) => {
      if (!report) return null;
      const byId = new Map();
      let transport = null;
      report.forEach((s) => { byId.set(s.id, s); if (s.type === 'transport' && s.selectedCandidatePairId) transport = s; });
      let pair = transport ? byId.get(transport.selectedCandidatePairId) : null;
      if (!pair) pair = [...byId.values()].find((s) => s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded');
      if (!pair) return null;
      const cand = (id) => {
        const c = byId.get(id) || {};
        return { protocol: c.protocol, candidateType: c.candidateType, address: c.address, port: c.port,
                 tcpType: c.tcpType, relayProtocol: c.relayProtocol };
      };
      return { local: cand(pair.localCandidateId), remote: cand(pair.remoteCandidateId), state: pair.state,
               nominated: pair.nominated, bytesSent: pair.bytesSent, bytesReceived: pair.bytesReceived };
    };
    const cam = [...room.localParticipant.videoTrackPublications.values()][0]?.track;
    const rp = [...room.remoteParticipants.values()].find((x) => x.identity === from);
    const remote = rp && [...rp.videoTrackPublications.values()][0]?.track;
    return {
      publisher: pick(await cam?.sender?.getStats()),
      subscriber: pick(await remote?.getRTCStatsReport()),
    };
  }, from);
}

export const describePair = (p) => (p
  ? `${p.local.protocol} ${p.local.candidateType}${p.local.tcpType ? `/${p.local.tcpType}` : ''} ${p.local.address}:${p.local.port} -> `
    + `${p.remote.protocol} ${p.remote.candidateType}${p.remote.tcpType ? `/${p.remote.tcpType}` : ''} ${p.remote.address}:${p.remote.port} `
    + `(${p.state}, nominated=${p.nominated}, sent ${p.bytesSent} B, received ${p.bytesReceived} B)`
  : 'no selected pair');

const FALLBACK_TABLE = 'moselle_fallback'; // bridge, hub namespace (pathBlackhole)
const FALLBACK_COUNTERS = ['udp_to_server', 'udp_from_server', 'tcp_to_server', 'tcp_from_server'];

/**
 * Silent drops on the path between the client and the server, changed while
 * a call runs (the fallback tests), as tests/connectivity/netlab.py's
 * PathBlackhole: table `bridge moselle_fallback` in the hub namespace, both
 * directions dropped. `set({ udp, tcpPorts })` replaces what is dropped in
 * one nft transaction; the counters (packets) keep counting across changes:
 * udp_to_server, udp_from_server (all UDP between client and server),
 * tcp_to_server, tcp_from_server (TCP to/from the server's `tcpPorts`).
 * Nothing is dropped until set(); remove() deletes the table.
 */
export function pathBlackhole(l) {
  const s = l.serverIp;
  const remove = () => { try { nft(['delete', 'table', 'bridge', FALLBACK_TABLE], undefined, l.nsHub); } catch { /* not there */ } };
  remove();
  nft(['-f', '-'], table('bridge', FALLBACK_TABLE, 'forward', 'accept', [], FALLBACK_COUNTERS), l.nsHub);
  const counters = () => Object.fromEntries(
    JSON.parse(nft(['-j', 'list', 'counters', 'table', 'bridge', FALLBACK_TABLE], undefined, l.nsHub)).nftables
      .filter((o) => o.counter).map((o) => [o.counter.name, o.counter.packets]));
  return {
    set({ udp = false, tcpPorts = [] } = {}) {
      const rules = [];
      if (udp) {
        rules.push(`iifname "v-client" ip daddr ${s} meta l4proto udp counter name "udp_to_server" drop`,
          `oifname "v-client" ip saddr ${s} meta l4proto udp counter name "udp_from_server" drop`);
      }
      for (const p of tcpPorts) {
        rules.push(`iifname "v-client" ip daddr ${s} tcp dport ${p} counter name "tcp_to_server" drop`,
          `oifname "v-client" ip saddr ${s} tcp sport ${p} counter name "tcp_from_server" drop`);
      }
      nft(['-f', '-'], [`flush chain bridge ${FALLBACK_TABLE} forward`,
        ...rules.map((r) => `add rule bridge ${FALLBACK_TABLE} forward ${r}`), ''].join('\n'), l.nsHub);
    },
    counters,
    report() {
      try {
        return `${Object.entries(counters()).map(([k, v]) => `${k} ${v}`).join(', ')} packets dropped on the path`;
      } catch (e) {
        return `<cannot read nft counters: ${e.message}>`;
      }
    },
    remove,
  };
}
