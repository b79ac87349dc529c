"""Seed corpora for the fuzz targets, made with the libraries the tests'
clients use: SignalRequests and JoinRequests encoded by LiveKit's own
protocol package, access tokens minted by livekit-api, an SDP offer in the
shape libwebrtc makes (one audio, one three-layer simulcast video section),
token-service bodies shaped as Element Call sends them, the shipped
configs, RoomService bodies in both Twirp encodings, and datagrams: a DTLS
ClientHello as OpenSSL sends it, STUN, RTP and RTCP in libwebrtc's shapes.
(Not captured from a live call: the SDKs do not expose their wire bytes, and
media after the handshake is encrypted.)

    .venv/bin/python fuzz/make_seeds.py   # writes fuzz/seeds/<target>/"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

from livekit import api
from livekit.protocol import models, room as room_pb, rtc as rtc_pb

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SEEDS = HERE / "seeds"

# An offer as libwebrtc (the LiveKit Python SDK) makes it for one audio and
# one simulcast video track, trimmed of addresses.
OFFER = """v=0\r
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r
s=-\r
t=0 0\r
a=group:BUNDLE 0 1\r
a=extmap-allow-mixed\r
a=msid-semantic: WMS\r
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126\r
c=IN IP4 0.0.0.0\r
a=rtcp:9 IN IP4 0.0.0.0\r
a=ice-ufrag:abcd\r
a=ice-pwd:abcdefghijklmnopqrstuvwx\r
a=ice-options:trickle\r
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r
a=setup:actpass\r
a=mid:0\r
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r
a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r
a=sendrecv\r
a=msid:PA_x TR_audio\r
a=rtcp-mux\r
a=rtpmap:111 opus/48000/2\r
a=rtcp-fb:111 transport-cc\r
a=fmtp:111 minptime=10;useinbandfec=1\r
a=rtpmap:63 red/48000/2\r
a=fmtp:63 111/111\r
a=ssrc:1001 cname:x\r
a=ssrc:1001 msid:PA_x TR_audio\r
m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 127\r
c=IN IP4 0.0.0.0\r
a=rtcp:9 IN IP4 0.0.0.0\r
a=ice-ufrag:abcd\r
a=ice-pwd:abcdefghijklmnopqrstuvwx\r
a=setup:actpass\r
a=mid:1\r
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r
a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r
a=extmap:11 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id\r
a=sendonly\r
a=msid:PA_x TR_video\r
a=rtcp-mux\r
a=rtcp-rsize\r
a=rtpmap:96 VP8/90000\r
a=rtcp-fb:96 goog-remb\r
a=rtcp-fb:96 transport-cc\r
a=rtcp-fb:96 ccm fir\r
a=rtcp-fb:96 nack\r
a=rtcp-fb:96 nack pli\r
a=rtpmap:97 rtx/90000\r
a=fmtp:97 apt=96\r
a=rtpmap:102 H264/90000\r
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f\r
a=rtpmap:103 rtx/90000\r
a=fmtp:103 apt=102\r
a=rtpmap:127 red/90000\r
a=rid:q send\r
a=rid:h send\r
a=rid:f send\r
a=simulcast:send q;h;f\r
"""


def write(target: str, name: str, data: bytes) -> None:
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def stun_binding(ufrag: str) -> bytes:
    user = f"{ufrag}:remote".encode()
    pad = (4 - len(user) % 4) % 4
    attr = struct.pack("!HH", 0x0006, len(user)) + user + b"\0" * pad
    return struct.pack("!HHI12s", 0x0001, len(attr), 0x2112A442, b"\x01" * 12) + attr


def dtls_client_hello() -> bytes:
    """The first datagram of a DTLS 1.2 handshake, as OpenSSL sends it to a UDP socket here."""
    import socket
    import subprocess
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(10)
        port = s.getsockname()[1]
        client = subprocess.Popen(["openssl", "s_client", "-dtls1_2", "-connect", f"127.0.0.1:{port}"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            return s.recv(2048)
        finally:
            client.kill()
            client.wait()


def rtp(pt: int, seq: int, ssrc: int, payload: bytes, marker: bool = False) -> bytes:
    """An RTP packet with the one-byte header extensions libwebrtc sends (audio level, TWCC)."""
    ext = bytes([0x10, 0x80, 0x30, 0x00, 0x01]) + b"\0" * 3
    header = struct.pack("!BBHII", 0x90, pt | (0x80 if marker else 0), seq, 90000 + seq * 3000, ssrc)
    return header + struct.pack("!HH", 0xBEDE, len(ext) // 4) + ext + payload


def main() -> None:
    # Signaling frames, binary and JSON.
    reqs = {
        "offer": rtc_pb.SignalRequest(offer=rtc_pb.SessionDescription(type="offer", sdp=OFFER, id=1)),
        "trickle": rtc_pb.SignalRequest(trickle=rtc_pb.TrickleRequest(
            candidateInit=json.dumps({"candidate": "candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host",
                                      "sdpMid": "0", "sdpMLineIndex": 0}), target=rtc_pb.PUBLISHER)),
        "add_track": rtc_pb.SignalRequest(add_track=rtc_pb.AddTrackRequest(
            cid="TR_video", name="cam", type=models.VIDEO, width=1280, height=720,
            source=models.TrackSource.CAMERA,
            layers=[models.VideoLayer(quality=models.LOW, width=320, height=180)])),
        "mute": rtc_pb.SignalRequest(mute=rtc_pb.MuteTrackRequest(sid="TR_x", muted=True)),
        "subscription": rtc_pb.SignalRequest(subscription=rtc_pb.UpdateSubscription(track_sids=["TR_x"], subscribe=True)),
        "track_setting": rtc_pb.SignalRequest(track_setting=rtc_pb.UpdateTrackSettings(
            track_sids=["TR_x"], width=640, height=360)),
        "leave": rtc_pb.SignalRequest(leave=rtc_pb.LeaveRequest()),
        "metadata": rtc_pb.SignalRequest(update_metadata=rtc_pb.UpdateParticipantMetadata(
            metadata="m", name="n", attributes={"k": "v"}, request_id=7)),
        "ping": rtc_pb.SignalRequest(ping_req=rtc_pb.Ping(timestamp=1, rtt=2)),
    }
    from google.protobuf import json_format
    for name, r in reqs.items():
        write("signal_frame", f"{name}.pb", r.SerializeToString())
        write("signal_frame", f"{name}.json", json_format.MessageToJson(r).encode())

    # /rtc/v1 join requests.
    join = rtc_pb.JoinRequest(
        client_info=models.ClientInfo(sdk=models.ClientInfo.PYTHON, version="1.2.1", protocol=16),
        connection_settings=rtc_pb.ConnectionSettings(auto_subscribe=True, adaptive_stream=True),
        publisher_offer=rtc_pb.SessionDescription(type="offer", sdp=OFFER, id=1),
        metadata="m", participant_attributes={"a": "b"})
    wrapped = rtc_pb.WrappedJoinRequest(join_request=join.SerializeToString()).SerializeToString()
    write("join_query", "v1", base64.urlsafe_b64encode(wrapped).rstrip(b"="))
    write("join_query", "v0", b"x&auto_subscribe=1&adaptive_stream=1&protocol=15&sdk=js&version=2.23.0")

    # Access tokens as livekit-api mints them.
    grants = [api.VideoGrants(room_join=True, room="r"), api.VideoGrants(room_admin=True, room="r", room_create=True)]
    for i, g in enumerate(grants):
        tok = api.AccessToken("devkey", "secret").with_identity("alice").with_name("Alice").with_grants(g)
        write("access_token", f"t{i}", tok.to_jwt().encode())
    write("access_token", "other-key", api.AccessToken("k2", "s2").with_identity("x").with_grants(grants[0])
          .to_jwt().encode())

    write("sdp", "offer", OFFER.encode())

    # VP8 and H.264 payload starts (keyframe and delta).
    write("keyframe", "vp8-key", bytes([0x90, 0x80, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01]))
    write("keyframe", "vp8-delta", bytes([0x90, 0x80, 0x00, 0x01]))
    write("keyframe", "h264-stap-a", bytes([0x78, 0x00, 0x04, 0x67, 0x42, 0x00, 0x1f, 0x00, 0x02, 0x68, 0xce, 0x00,
                                           0x02, 0x65, 0x88]))
    write("keyframe", "h264-fu-a", bytes([0x7c, 0x85, 0x88, 0x84]))

    write("stun_ufrag", "binding", stun_binding("abcd"))

    # The engine's datagram entry: the first byte picks the source (bit 0:
    # the participant's path, else a stranger) and bit 1 TCP framing.
    hello = dtls_client_hello()
    vp8_key = bytes([0x90, 0x80, 0x00, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01]) + b"\x55" * 40
    rr = struct.pack("!BBHI", 0x81, 201, 7, 1) + struct.pack("!IIIIII", 0x1234, 0, 10, 0, 0, 0)
    pli = struct.pack("!BBHII", 0x81, 206, 2, 1, 0x1234)
    twcc = struct.pack("!BBHII", 0x8F, 205, 5, 1, 0x1234) + struct.pack("!HHI", 1, 2, 0x000100) \
        + struct.pack("!HBB", 0x2002, 4, 4)
    for pick, where in ((0, "stranger"), (1, "peer"), (3, "peer-tcp")):
        write("datagram", f"{where}-stun", bytes([pick]) + stun_binding("abcd"))
        write("datagram", f"{where}-dtls-hello", bytes([pick]) + hello)
        write("datagram", f"{where}-rtp-vp8", bytes([pick]) + rtp(96, 1, 0x1234, vp8_key, marker=True))
        write("datagram", f"{where}-rtcp", bytes([pick]) + rr + pli + twcc)
    write("rfc4571", "two-frames", bytes([7]) + struct.pack("!H", len(stun_binding("abcd"))) + stun_binding("abcd")
          + b"\x00\x03abc")

    # Token service bodies as Element Call sends them.
    openid = {"access_token": "t", "token_type": "Bearer", "matrix_server_name": "localhost", "expires_in": 3600}
    write("token_service_body", "get_token", json.dumps({
        "room_id": "!room:localhost", "slot_id": "m.call#ROOM", "openid_token": openid,
        "member": {"id": "m1", "claimed_user_id": "@alice:localhost", "claimed_device_id": "DEV"},
        "delay_id": "d1", "delay_timeout": 10000}).encode())
    write("token_service_body", "sfu_get", json.dumps({
        "room": "!room:localhost", "openid_token": openid, "device_id": "DEV"}).encode())

    write("config", "default", (REPO / "config" / "moselle.toml").read_bytes())
    write("config", "packaged", (REPO / "packaging" / "moselle.toml").read_bytes())

    bodies = {
        "create": room_pb.CreateRoomRequest(name="r", empty_timeout=60, max_participants=2, metadata="m"),
        "update_participant": room_pb.UpdateParticipantRequest(
            room="r", identity="a", metadata="m", attributes={"k": "v"},
            permission=models.ParticipantPermission(can_publish=False)),
        "send_data": room_pb.SendDataRequest(room="r", data=b"hi", kind=models.DataPacket.RELIABLE, topic="t",
                                             destination_identities=["b"]),
        "list": room_pb.ListRoomsRequest(names=["r"]),
    }
    for name, b in bodies.items():
        write("twirp", f"{name}.pb", b.SerializeToString())
        write("twirp", f"{name}.json", json_format.MessageToJson(b).encode())
    print(f"seeds written to {SEEDS}")


if __name__ == "__main__":
    main()
