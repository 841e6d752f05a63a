"""Benchmarks of supervisord-vm against bare systemd and libvirt (issue 8; see bench/RESULTS.md)."""
