"""TFRecord checksums (training/crc32c.py): the byte loop against the chunked numpy form, per input size.

    python bench/tfrecord_crc.py
    python bench/tfrecord_crc.py --sizes 32768 5292000 --repeats 5

Prints the best-of-N seconds of each and the speed-up. The default sizes are around the switch-over
(`crc32c.CHUNKED_FROM`) and a 10 s and a 30 s demo WAV (stereo, 16-bit, 44.1 kHz), which the figures in
training/crc32c.py's docstring come from.
"""

from __future__ import annotations

import argparse
import os

from adapter_layers import best_ms  # this folder's timing helper
from sa3_lora_studio.training.crc32c import CHUNKED_FROM, advance_register, advance_register_chunked

DEMO_WAV_BYTES = {"10 s WAV": 44 + 10 * 44100 * 4, "30 s WAV": 44 + 30 * 44100 * 4}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 24576, 32768, 65536,
                                                               *DEMO_WAV_BYTES.values()])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    names = {v: k for k, v in DEMO_WAV_BYTES.items()}
    print(f"chunked from {CHUNKED_FROM} bytes")
    for size in args.sizes:
        data = os.urandom(size)
        loop = best_ms(lambda d=data: advance_register(d, 0xFFFFFFFF), args.repeats)
        chunked = best_ms(lambda d=data: advance_register_chunked(d, 0xFFFFFFFF), args.repeats)
        print(f"  {size:>9} bytes {names.get(size, ''):9s} loop {loop:8.2f} ms  chunked {chunked:7.2f} ms  "
              f"({loop / chunked:5.1f}x)", flush=True)


if __name__ == "__main__":
    main()
