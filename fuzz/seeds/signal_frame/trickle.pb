k
i{"candidate": "candidate:1 1 udp 2122260223 192.0.2.1 50000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}