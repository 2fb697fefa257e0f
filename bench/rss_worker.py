"""One rank of train_ddp.py that also reports its whole-process peak RSS (used by bench/sharded_rss.py)."""
import json
import os
import resource
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_ddp  # noqa: E402

if __name__ == "__main__":
    rc = train_ddp.cli(sys.argv[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    with open(f"{os.environ['RSS_OUT']}.{os.environ.get('RANK', '0')}", "w") as f:
        json.dump({"peak_rss": peak}, f)
    sys.exit(rc)
