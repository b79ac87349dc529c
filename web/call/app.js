// Moselle's call page: join a room with livekit-client, show everyone's
// video, play their audio, show who speaks. window.moselleCall exposes the
// Room to browser tests.
/* global LivekitClient */
'use strict';

const { Room, RoomEvent, Track, ExternalE2EEKeyProvider } = LivekitClient;
const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);

function showError(msg) {
  const e = $('#error');
  e.textContent = msg;
  e.hidden = false;
}

function tileFor(participant) {
  const id = `tile-${participant.identity}`;
  let tile = document.getElementById(id);
  if (!tile) {
    tile = document.createElement('div');
    tile.className = 'tile';
    tile.id = id;
    tile.dataset.identity = participant.identity;
    const label = document.createElement('span');
    label.className = 'name';
    tile.appendChild(label);
    $('#tiles').appendChild(tile);
  }
  const micMuted = participant.isMicrophoneEnabled === false;
  tile.querySelector('.name').innerHTML = '';
  tile.querySelector('.name').append(participant.name || participant.identity);
  if (micMuted) {
    const m = document.createElement('span');
    m.className = 'muted';
    m.textContent = '(muted)';
    tile.querySelector('.name').appendChild(m);
  }
  return tile;
}

function attach(track, participant) {
  const tile = tileFor(participant);
  const el = track.attach();
  el.dataset.trackSid = track.sid || '';
  if (track.kind === Track.Kind.Video) {
    tile.querySelector('video')?.remove();
    tile.prepend(el);
  } else {
    el.hidden = true;
    tile.appendChild(el);
  }
}

async function join(form) {
  const room = form.room.value.trim();
  const name = form.name.value.trim();
  const e2eeKey = form.e2ee.value;
  const withMedia = form.media.checked;
  const canUpdateMetadata = params.get('canUpdateMetadata') === '1';
  const res = await fetch('token', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ room, identity: name, name, can_update_metadata: canUpdateMetadata }),
  });
  if (!res.ok) throw new Error(`token request failed: ${res.status} ${await res.text()}`);
  const { token, url } = await res.json();

  const options = { adaptiveStream: true, dynacast: true };
  let keyProvider;
  if (e2eeKey) {
    keyProvider = new ExternalE2EEKeyProvider();
    options.e2ee = { keyProvider, worker: new Worker('livekit-client.e2ee.worker.js') };
  }
  const lk = new Room(options);
  window.moselleCall.room = lk;
  const log = (type, detail) => window.moselleCall.events.push({ t: Date.now(), type, ...detail });

  lk.on(RoomEvent.TrackSubscribed, (track, pub, p) => { attach(track, p); log('subscribed', { from: p.identity, kind: track.kind }); })
    .on(RoomEvent.TrackUnsubscribed, (track) => track.detach().forEach((el) => el.remove()))
    .on(RoomEvent.ParticipantConnected, (p) => { tileFor(p); log('joined', { who: p.identity }); })
    .on(RoomEvent.ParticipantDisconnected, (p) => { document.getElementById(`tile-${p.identity}`)?.remove(); log('left', { who: p.identity }); })
    .on(RoomEvent.TrackMuted, (_pub, p) => tileFor(p))
    .on(RoomEvent.TrackUnmuted, (_pub, p) => tileFor(p))
    .on(RoomEvent.ActiveSpeakersChanged, (speakers) => {
      document.querySelectorAll('.tile').forEach((t) => t.classList.remove('speaking'));
      speakers.forEach((p) => document.getElementById(`tile-${p.identity}`)?.classList.add('speaking'));
      $('#speaker b').textContent = speakers.map((p) => p.name || p.identity).join(', ') || '—';
      log('speakers', { who: speakers.map((p) => p.identity) });
    })
    .on(RoomEvent.DataReceived, (payload, p, kind, topic) => log('data', { from: p?.identity, text: new TextDecoder().decode(payload), kind, topic }))
    .on(RoomEvent.SignalReconnecting, () => log('signal_reconnecting', {}))
    .on(RoomEvent.Reconnecting, () => { $('#status').textContent = 'reconnecting…'; log('reconnecting', {}); })
    .on(RoomEvent.Reconnected, () => { $('#status').textContent = 'connected'; log('reconnected', {}); })
    .on(RoomEvent.Disconnected, (reason) => { $('#status').textContent = 'disconnected'; log('disconnected', { reason }); })
    .on(RoomEvent.ConnectionQualityChanged, (quality, p) => log('quality', { who: p.identity, quality }))
    .on(RoomEvent.EncryptionError, (err) => log('encryption_error', { message: String(err?.message || err) }));

  await lk.connect(url, token);
  if (keyProvider) {
    await keyProvider.setKey(e2eeKey);
    await lk.setE2EEEnabled(true);
  }
  $('#join').hidden = true;
  $('#call').hidden = false;
  $('#status').textContent = 'connected';
  tileFor(lk.localParticipant);
  lk.remoteParticipants.forEach((p) => tileFor(p));
  if (withMedia) {
    await lk.localParticipant.enableCameraAndMicrophone();
    lk.localParticipant.videoTrackPublications.forEach((pub) => pub.track && attach(pub.track, lk.localParticipant));
  }
  log('connected', { identity: lk.localParticipant.identity });
}

window.moselleCall = { room: null, events: [] };

$('#join').addEventListener('submit', (ev) => {
  ev.preventDefault();
  join(ev.target).catch((e) => { console.error(e?.stack || e); showError(String(e?.message || e)); });
});
$('#mic').addEventListener('click', async () => {
  const lp = window.moselleCall.room.localParticipant;
  const on = !lp.isMicrophoneEnabled;
  await lp.setMicrophoneEnabled(on);
  $('#mic').textContent = on ? 'Mute microphone' : 'Unmute microphone';
  tileFor(lp);
});
$('#cam').addEventListener('click', async () => {
  const lp = window.moselleCall.room.localParticipant;
  const on = !lp.isCameraEnabled;
  await lp.setCameraEnabled(on);
  $('#cam').textContent = on ? 'Turn camera off' : 'Turn camera on';
});
$('#leave').addEventListener('click', () => window.moselleCall.room?.disconnect());

// Prefill from the address: ?room=R&name=N&e2ee=K&media=0&autojoin=1
for (const k of ['room', 'name', 'e2ee']) if (params.get(k)) $('#join')[k].value = params.get(k);
if (params.get('media') === '0') $('#join').media.checked = false;
if (params.get('autojoin') === '1') $('#join').requestSubmit();
