"""``python -m rwkv_chat.daemon [--model PATH] [--strategy S]`` — run the daemon in the foreground."""

import sys

from rwkv_chat.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["daemon", "start", "--foreground", *sys.argv[1:]]))
