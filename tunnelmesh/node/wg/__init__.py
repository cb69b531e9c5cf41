"""Sans-I/O WireGuard protocol: Noise IKpsk2 handshake, cookies, replay window, timers, sessions."""
