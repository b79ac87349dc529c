// A wss:// call without a proxy: the node serves HTTPS and WSS itself
// (server.tls_cert_file / tls_key_file) and two Chromium pages, trusting only
// that test certificate's key, hold a call through it and decode each other.
import { test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startServer, launchBrowser, openCall, waitFor, inboundVideo, HOST } from './harness.mjs';

const env = { server: null, browser: null, spki: null };

before(async () => {
  const dir = mkdtempSync(join(tmpdir(), 'moselle-tls-'));
  const [cert, key] = [join(dir, 'cert.pem'), join(dir, 'key.pem')];
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=moselle.test', '-addext', `subjectAltName=IP:${HOST}`],
  { stdio: 'ignore' });
  // Chromium's SPKI pin: base64 SHA-256 of the certificate's public key (DER).
  const pub = execFileSync('openssl', ['x509', '-in', cert, '-pubkey', '-noout']);
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'der'], { input: pub });
  env.spki = createHash('sha256').update(der).digest('base64');
  const cfg = join(dir, 'tls.toml');
  writeFileSync(cfg, `[server]\ntls_cert_file = "${cert}"\ntls_key_file = "${key}"\n`);
  env.server = await startServer(['--config', cfg], { ca: readFileSync(cert) });
  env.browser = await launchBrowser(env.server, { trustSpki: env.spki });
});

after(async () => {
  await env.browser?.close();
  await env.server?.stop();
});

test('two browsers hold a call over wss:// to the built-in TLS listener', async () => {
  assert.match(env.server.base, /^https:/);
  const room = `tls-${Date.now()}`;
  const alice = await openCall(env.browser, env.server, { room, name: 'Alice' });
  const bob = await openCall(env.browser, env.server, { room, name: 'Bob' });
  for (const p of [alice, bob]) {
    const url = await p.page.evaluate(() => window.moselleCall.room.engine?.url || '');
    assert.match(url, /^wss:\/\//, `${p.name} signals over wss://, not ${url}`);
  }
  for (const [p, from] of [[alice, 'Bob'], [bob, 'Alice']]) {
    await waitFor(`${p.name} to decode ${from}'s video over the TLS node`, async () => {
      const s = await inboundVideo(p, from);
      return s && s.framesDecoded >= 30;
    }, 30000);
  }
  for (const p of [alice, bob]) await p.context.close();
});
