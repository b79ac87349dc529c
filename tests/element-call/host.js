// A minimal Matrix client that embeds Element Call the way Element Web does:
// a logged-in matrix-js-sdk client with Rust crypto, and matrix-widget-api's
// ClientWidgetApi with a WidgetDriver of our own that does on the client's
// behalf what the app asks for (room and state events, delayed events,
// encrypted to-device messages, OpenID, RTC transports) and feeds it the
// room's live events, state and decrypted to-device messages.
//
// Parameters (query string of host.html):
//   hs, user, token, device   the homeserver and the logged-in account
//   room                      the room to hold the call in
//   app                       Element Call's base URL (its index.html is there)
//   intent                    start_call | join_existing
//   params                    optional JSON object of more widget URL parameters
//   hold=1                    log in and sync (uploading the device's keys), but embed
//                             the app only when the test calls window.host.release()
//
// window.host exposes what the tests read: timings, counters of the
// to-device messages sent and received per type, every widget action, errors.
import {
  ClientEvent,
  createClient,
  RoomEvent,
  RoomStateEvent,
  SyncState,
} from 'matrix-js-sdk';
import {
  ClientWidgetApi,
  OpenIDRequestState,
  Widget,
  WidgetDriver,
} from 'matrix-widget-api';

const q = new URLSearchParams(location.search);
const cfg = {
  hs: q.get('hs'),
  userId: q.get('user'),
  accessToken: q.get('token'),
  deviceId: q.get('device'),
  roomId: q.get('room'),
  app: q.get('app'),
  intent: q.get('intent') || 'join_existing',
  hold: q.get('hold') === '1',
  params: JSON.parse(q.get('params') || '{}'),
};

const host = {
  cfg: { ...cfg, accessToken: undefined },
  state: 'starting',
  times: {},                 // epoch ms: synced, widgetCreated, contentLoaded, ready, joined, hungUp, closed
  toDeviceSent: {},          // type -> { encrypted, clear, devices, unknownDevices }
  toDeviceReceived: {},      // type -> { encrypted, clear }
  keysLog: [],               // encryption key to-device messages: { dir, peer, encrypted, at }
  actions: [],               // from-widget actions the host answered itself: { action, at }
  capabilities: [],
  transportsAsked: 0,
  delayed: { sent: 0, restart: 0, cancel: 0, send: 0 },
  sent: [],                  // room/state events sent: { type, stateKey, sticky, delayed, at }
  memberLog: [],             // call membership updates the host fed to the widget: { kind, type, sender, key, active, at }
  undecryptable: [],         // room events the host could not decrypt (fed to the app as they are): { id, sender, at }
  errors: [],
  api: null,
  client: null,
};
window.host = host;
const now = () => Date.now();
const mark = (name) => { if (host.times[name] === undefined) host.times[name] = now(); };
const setStatus = (s) => { host.state = s; document.getElementById('status').textContent = `${cfg.userId}: ${s}`; };
const fail = (where, e) => {
  const msg = `${where}: ${e && e.stack ? e.stack : e}`;
  host.errors.push(msg);
  console.error(msg);
};

function raw(ev) {
  const e = { ...ev.getEffectiveEvent() };
  if (!e.room_id) e.room_id = ev.getRoomId() || cfg.roomId;
  if (!e.unsigned) e.unsigned = {};
  return e;
}

/** Record call membership events (state or sticky) as the host passes them on. */
function logMember(ev) {
  if (ev.isDecryptionFailure()) {
    host.undecryptable.push({ id: ev.getId(), sender: ev.getSender(), at: now() });
    return;
  }
  const type = ev.getType();
  if (type !== 'org.matrix.msc3401.call.member' && type !== 'org.matrix.msc4143.rtc.member') return;
  const content = ev.getContent() || {};
  const keys = Object.keys(content).filter((k) => k !== 'msc4354_sticky_key');
  host.memberLog.push({
    kind: ev.isState() ? 'state' : (ev.unstableStickyInfo ? 'sticky' : 'event'), type, sender: ev.getSender(),
    key: ev.isState() ? ev.getStateKey() : content.msc4354_sticky_key, active: keys.length > 0, at: now(),
  });
}

function bump(map, type, key, n = 1) {
  const m = (map[type] ||= {});
  m[key] = (m[key] || 0) + n;
}

class HostDriver extends WidgetDriver {
  constructor(client, roomId) {
    super();
    this.client = client;
    this.roomId = roomId;
  }

  room(roomId) {
    const room = this.client.getRoom(roomId || this.roomId);
    if (!room) throw new Error(`unknown room ${roomId}`);
    return room;
  }

  async validateCapabilities(requested) {
    host.capabilities = [...requested];
    return new Set(requested);
  }

  async sendEvent(eventType, content, stateKey = null, roomId = null) {
    const rid = roomId || this.roomId;
    const r = stateKey !== null && stateKey !== undefined
      ? await this.client.sendStateEvent(rid, eventType, content, stateKey)
      : await this.client.sendEvent(rid, eventType, content);
    host.sent.push({ type: eventType, stateKey, at: now() });
    return { roomId: rid, eventId: r.event_id };
  }

  // MSC4354 sticky events (MSC4407 in the widget API): Element Call's
  // matrix_2_0 mode publishes its call membership as sticky
  // org.matrix.msc4143.rtc.member room events, and its leave as a delayed one.
  async sendStickyEvent(stickyDurationMs, eventType, content, roomId = null) {
    const rid = roomId || this.roomId;
    const r = await this.client._unstable_sendStickyEvent(rid, stickyDurationMs, null, eventType, content);
    host.sent.push({ type: eventType, sticky: stickyDurationMs, at: now() });
    return { roomId: rid, eventId: r.event_id };
  }

  async sendDelayedStickyEvent(delay, stickyDurationMs, eventType, content, roomId = null) {
    const rid = roomId || this.roomId;
    const r = await this.client._unstable_sendStickyDelayedEvent(rid, stickyDurationMs, { delay }, null, eventType, content);
    host.delayed.sent++;
    host.sent.push({ type: eventType, sticky: stickyDurationMs, delayed: delay, at: now() });
    return { roomId: rid, delayId: r.delay_id };
  }

  async sendDelayedEvent(delay, eventType, content, stateKey = null, roomId = null) {
    const rid = roomId || this.roomId;
    const r = stateKey !== null && stateKey !== undefined
      ? await this.client._unstable_sendDelayedStateEvent(rid, { delay }, eventType, content, stateKey)
      : await this.client._unstable_sendDelayedEvent(rid, { delay }, null, eventType, content);
    host.delayed.sent++;
    return { roomId: rid, delayId: r.delay_id };
  }

  async cancelScheduledDelayedEvent(delayId) {
    host.delayed.cancel++;
    await this.client._unstable_cancelScheduledDelayedEvent(delayId);
  }

  async restartScheduledDelayedEvent(delayId) {
    host.delayed.restart++;
    await this.client._unstable_restartScheduledDelayedEvent(delayId);
  }

  async sendScheduledDelayedEvent(delayId) {
    host.delayed.send++;
    await this.client._unstable_sendScheduledDelayedEvent(delayId);
  }

  // Wait (a while) until our crypto knows every target device: a device it
  // does not know gets no key, silently.
  async knownDevices(targets) {
    const crypto = this.client.getCrypto();
    const users = [...new Set(targets.map((t) => t.userId))];
    const end = Date.now() + 10000;
    for (;;) {
      const info = await crypto.getUserDeviceInfo(users, true);
      const missing = targets.filter((t) => !info.get(t.userId)?.has(t.deviceId));
      if (!missing.length || Date.now() > end) return { info, missing };
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  async sendToDevice(eventType, encrypted, contentMap) {
    // Flatten {user: {device: content}}, expanding "*" to the user's known devices.
    const targets = [];
    for (const [userId, devices] of Object.entries(contentMap)) {
      for (const [deviceId, content] of Object.entries(devices)) targets.push({ userId, deviceId, content });
    }
    if (!encrypted) {
      await this.client.queueToDevice({
        eventType,
        batch: targets.map(({ userId, deviceId, content }) => ({ userId, deviceId, payload: content })),
      });
      bump(host.toDeviceSent, eventType, 'clear');
      bump(host.toDeviceSent, eventType, 'devices', targets.length);
      return;
    }
    const wildcard = targets.filter((t) => t.deviceId === '*');
    const { info, missing } = await this.knownDevices(targets.filter((t) => t.deviceId !== '*'));
    for (const w of wildcard) {
      const all = (await this.client.getCrypto().getUserDeviceInfo([w.userId], true)).get(w.userId);
      for (const deviceId of all?.keys() || []) targets.push({ userId: w.userId, deviceId, content: w.content });
    }
    const concrete = targets.filter((t) => t.deviceId !== '*' && info.get(t.userId)?.has(t.deviceId) !== false);
    // One encryption per distinct payload (Element Call sends the same to all).
    const groups = new Map();
    for (const t of concrete) {
      const key = JSON.stringify(t.content);
      if (!groups.has(key)) groups.set(key, { content: t.content, devices: [] });
      groups.get(key).devices.push({ userId: t.userId, deviceId: t.deviceId });
    }
    let delivered = 0;
    for (const { content, devices } of groups.values()) {
      const batch = await this.client.getCrypto().encryptToDeviceMessages(eventType, devices, content);
      delivered += batch.batch.length;
      await this.client.queueToDevice(batch);
    }
    bump(host.toDeviceSent, eventType, 'encrypted');
    bump(host.toDeviceSent, eventType, 'devices', delivered);
    if (missing.length) bump(host.toDeviceSent, eventType, 'unknownDevices', missing.length);
    if (eventType.includes('encryption_keys')) {
      for (const t of concrete) host.keysLog.push({ dir: 'sent', peer: `${t.userId}:${t.deviceId}`, encrypted: true, at: now() });
    }
  }

  async readRoomState(roomId, eventType, stateKey) {
    const state = this.room(roomId).currentState;
    if (stateKey === undefined) return state.getStateEvents(eventType).map(raw);
    const ev = state.getStateEvents(eventType, stateKey);
    return ev ? [raw(ev)] : [];
  }

  async readRoomTimeline(roomId, eventType, msgtype, stateKey, limit, since) {
    const events = this.room(roomId).getLiveTimeline().getEvents();
    const out = [];
    for (let i = events.length - 1; i >= 0 && out.length < limit; i--) {
      const ev = events[i];
      if (since !== undefined && ev.getId() === since) break;
      if (ev.getType() !== eventType) continue;
      if (stateKey !== undefined && ev.getStateKey() !== stateKey) continue;
      if (msgtype !== undefined && ev.getContent().msgtype !== msgtype) continue;
      out.push(raw(ev));
    }
    return out;
  }

  async readEventRelations(eventId, roomId, relationType, eventType, from, to, limit, direction) {
    const r = await this.client.relations(roomId || this.roomId, eventId, relationType ?? null, eventType ?? null,
      { from, to, limit, dir: direction });
    return { chunk: r.events.map(raw), nextBatch: r.nextBatch ?? undefined, prevBatch: r.prevBatch ?? undefined };
  }

  // The room's current sticky events (decrypted), pushed to the widget when
  // it gets its capabilities: how a member joining later learns who is in
  // the call.
  async readStickyEvents(roomId) {
    const events = [...this.room(roomId)._unstable_getStickyEvents()];
    await Promise.all(events.map((ev) => this.client.decryptEventIfNeeded(ev)));
    host.stickyRead = (host.stickyRead || 0) + 1;
    events.forEach(logMember);
    return events.map(raw);
  }

  askOpenID(observer) {
    this.client.getOpenIdToken().then(
      (token) => observer.update({ state: OpenIDRequestState.Allowed, token }),
      (e) => { fail('getOpenIdToken', e); observer.update({ state: OpenIDRequestState.Blocked }); },
    );
  }

  async getRtcTransports() {
    host.transportsAsked++;
    const rtc_transports = await this.client._unstable_getRTCTransports();
    host.transports = rtc_transports;
    return { rtc_transports };
  }

  async getMediaConfig() {
    return this.client.getMediaConfig();
  }

  getKnownRooms() {
    return this.client.getRooms().map((r) => r.roomId);
  }
}

async function startClient() {
  const client = createClient({
    baseUrl: cfg.hs,
    accessToken: cfg.accessToken,
    userId: cfg.userId,
    deviceId: cfg.deviceId,
  });
  host.client = client;
  setStatus('crypto');
  await client.initRustCrypto({ useIndexedDB: false });
  setStatus('syncing');
  const synced = new Promise((resolve, reject) => {
    const on = (state, _prev, data) => {
      if (state === SyncState.Prepared || state === SyncState.Syncing) { client.off(ClientEvent.Sync, on); resolve(); }
      if (state === SyncState.Error) host.errors.push(`sync error: ${data?.error}`);
    };
    client.on(ClientEvent.Sync, on);
    setTimeout(() => reject(new Error('initial sync took more than 30 s')), 30000);
  });
  await client.startClient({ initialSyncLimit: 20 });
  await synced;
  const room = client.getRoom(cfg.roomId);
  if (!room) throw new Error(`room ${cfg.roomId} not in the initial sync`);
  // Know every member's devices before the app sends them keys.
  const members = room.getJoinedMembers().map((m) => m.userId);
  await client.getCrypto().getUserDeviceInfo(members, true);
  await client.getCrypto().prepareToEncrypt(room);
  mark('synced');
  return client;
}

function widgetUrl() {
  const base = new URL('index.html', cfg.app);
  base.searchParams.set('widgetId', 'moselle-ec');
  base.searchParams.set('parentUrl', location.href);
  const frag = new URLSearchParams({
    roomId: cfg.roomId,
    userId: cfg.userId,
    deviceId: cfg.deviceId,
    baseUrl: cfg.hs,
    intent: cfg.intent,
    skipLobby: 'true',
    header: 'none',
    confineToRoom: 'true',
    perParticipantE2EE: 'true',
    lang: 'en',
    theme: 'dark',
    ...cfg.params,
  });
  return `${base}#?${frag}`;
}

function embed(client) {
  const url = widgetUrl();
  host.widgetUrl = url;
  const widget = new Widget({
    id: 'moselle-ec',
    creatorUserId: cfg.userId,
    type: 'm.custom',
    url,
    waitForIframeLoad: false,
    data: {},
  });
  const iframe = document.createElement('iframe');
  iframe.allow = 'camera; microphone; display-capture; autoplay; clipboard-write';
  iframe.name = 'element-call';
  // ClientWidgetApi needs the iframe's window: attach it (blank) first.
  document.getElementById('widget').appendChild(iframe);
  const driver = new HostDriver(client, cfg.roomId);
  const api = new ClientWidgetApi(widget, iframe, driver);
  host.api = api;
  api.setViewedRoomId(cfg.roomId);

  api.on('preparing', () => setStatus('widget preparing'));
  api.on('ready', () => { mark('ready'); setStatus('widget ready'); });
  api.on('action:content_loaded', () => mark('contentLoaded'));
  const answer = (action, onIt) => api.on(`action:${action}`, (ev) => {
    ev.preventDefault();
    host.actions.push({ action, data: ev.detail.data, at: now() });
    try { onIt?.(ev.detail.data); } catch (e) { fail(action, e); }
    api.transport.reply(ev.detail, {});
  });
  answer('set_always_on_screen');
  answer('io.element.join', () => { mark('joined'); setStatus('in call'); });
  answer('im.vector.hangup', () => { mark('hungUp'); setStatus('hung up'); });
  // The app asks to be closed after the user hung up: dispose of it as Element Web does.
  answer('io.element.close', () => {
    mark('closed');
    setStatus('closed');
    setTimeout(() => { host.closed = true; api.stop(); iframe.remove(); }, 0);
  });
  answer('io.element.device_mute');

  // Live room events (decrypted), for this room, as Element Web feeds them:
  // from sync (ClientEvent.Event), so our own events arrive as the server's
  // echo, which carries MSC4354's `msc4354_sticky` (a local echo does not:
  // the app would then miss its own sticky membership and re-join).
  // Includes sticky events delivered in sync's msc4354_sticky section.
  const feed = (ev) => client.decryptEventIfNeeded(ev)
    .then(() => { logMember(ev); return api.feedEvent(raw(ev)); })
    .catch((e) => fail(`feedEvent ${ev.getType()}`, e));
  client.on(ClientEvent.Event, (ev) => {
    if (host.closed || ev.isState() || ev.getRoomId() !== cfg.roomId || !ev.getId()?.startsWith('$')) return;
    feed(ev);
  });
  // State events of the timeline (as before; their state updates go below).
  client.on(RoomEvent.Timeline, (ev, room, toStart, _removed, data) => {
    if (host.closed || toStart || !data?.liveEvent || room?.roomId !== cfg.roomId || !ev.isState()) return;
    feed(ev);
  });
  client.on(RoomStateEvent.Events, (ev) => {
    if (host.closed || ev.getRoomId() !== cfg.roomId) return;
    logMember(ev);
    api.feedStateUpdate(raw(ev)).catch((e) => fail(`feedStateUpdate ${ev.getType()}`, e));
  });
  // Decrypted to-device messages (the app's per-participant media keys).
  client.on(ClientEvent.ReceivedToDeviceMessage, ({ message, encryptionInfo }) => {
    const encrypted = encryptionInfo !== null && encryptionInfo !== undefined;
    bump(host.toDeviceReceived, message.type, encrypted ? 'encrypted' : 'clear');
    if (message.type.includes('encryption_keys')) {
      host.keysLog.push({ dir: 'received', peer: `${message.sender}:${message.content?.member?.claimed_device_id}`, encrypted, at: now() });
    }
    if (!host.closed) api.feedToDevice({ ...message }, encrypted).catch((e) => fail(`feedToDevice ${message.type}`, e));
  });

  iframe.src = url;
  mark('widgetCreated');
}

/** Ask the app to hang up, as Element Web does when the user closes the call. */
host.hangup = () => host.api.transport.send('im.vector.hangup', {});

(async () => {
  try {
    const client = await startClient();
    if (cfg.hold) {
      setStatus('online, holding');
      await new Promise((resolve) => { host.release = resolve; });
    }
    embed(client);
  } catch (e) {
    fail('start', e);
    setStatus(`failed: ${e.message}`);
  }
})();
