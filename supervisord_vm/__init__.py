"""supervisord-vm: QEMU virtual machines supervised as transient systemd scopes."""

__version__ = "0.1.0"
