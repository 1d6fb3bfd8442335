"""tcpipstat: per-socket TCP/IP statistics (netstat -s per socket), collected with SystemTap."""
__version__ = "0.1.0"
