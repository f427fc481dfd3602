"""A progressive JPEG made cheap to decode at 1/8 scale, to the same pixels.

A progressive JPEG stores its DCT coefficients in several scans: first the DC coefficient of
every block, then bands of AC coefficients and refinements of them, most of the file's bytes.
Decoded at 1/8 scale (Pillow's draft mode for a small target), libjpeg reduces each 8x8 block
of a full-resolution component to one pixel from its DC coefficient alone, yet it still
entropy-decodes every AC scan first: a progressive 4-MPix JPEG took ~6x as long to
draft-decode as a baseline one (benchmarks/RESULTS.md). Here each AC scan of a
full-resolution component is replaced by one that says "no coefficient" for every block (a
few end-of-band runs under a Huffman table of its own). Dropping those scans instead moves
the pixels (measured: up to 31 levels), as a decoder that misses scans estimates the absent
coefficients (block smoothing). Components sampled below full resolution (the chroma of a
4:2:0 file) are scaled up through a larger IDCT that reads AC coefficients: their scans are
kept.
"""

from __future__ import annotations

EOI, SOS, SOF2, DHT, DRI = 0xD9, 0xDA, 0xC2, 0xC4, 0xDD
# Start-of-frame markers other than SOF2 (progressive, Huffman): baseline, extended, lossless,
# arithmetic and hierarchical frames, left to the full decode.
_OTHER_SOF = {0xC0, 0xC1, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_LONGEST_RUN = (1 << 15) - 1  # EOB14: 2^14 blocks plus 14 bits


def _scan_end(data: bytes, i: int) -> int:
    """Where the entropy-coded data starting at ``i`` ends: the next marker; -1 if none."""
    while True:
        j = data.find(b"\xff", i)
        if j < 0 or j + 1 >= len(data):
            return -1
        b = data[j + 1]
        if b == 0x00 or 0xD0 <= b <= 0xD7:  # a stuffed 0xFF byte, or a restart marker
            i = j + 2
        elif b == 0xFF:  # fill bytes before a marker
            i = j + 1
        else:
            return j


def _segment(marker: int, body: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(body) + 2).to_bytes(2, "big") + body


def _ac_tables(body: bytes) -> dict[int, bytes] | None:
    """The AC tables a DHT segment's body defines: {slot: class/slot byte + counts + symbols}."""
    tables, i = {}, 0
    while i < len(body):
        if i + 17 > len(body):
            return None
        end = i + 17 + sum(body[i + 1 : i + 17])
        if end > len(body):
            return None
        if body[i] >> 4 == 1:
            tables[body[i] & 15] = body[i:end]
        i = end
    return tables


def _empty_scan(blocks: int, slot: int) -> tuple[bytes, bytes]:
    """A DHT for AC ``slot`` and entropy data of end-of-band runs covering ``blocks`` blocks."""
    runs = [_LONGEST_RUN] * (blocks // _LONGEST_RUN)
    if blocks % _LONGEST_RUN:
        runs.append(blocks % _LONGEST_RUN)
    sizes = sorted({r.bit_length() - 1 for r in runs})  # EOBr: 2^r blocks plus r more bits
    # Two-bit codes 00 and 01, in symbol order (no code may be all ones).
    counts = bytes([0, len(sizes)] + [0] * 14)
    table = bytes([0x10 | slot]) + counts + bytes(r << 4 for r in sizes)
    bits, n = 0, 0
    for run in runs:
        r = run.bit_length() - 1
        bits = (bits << (2 + r)) | (sizes.index(r) << r) | (run - (1 << r))
        n += 2 + r
    pad = -n % 8
    bits, n = (bits << pad) | ((1 << pad) - 1), n + pad  # padded with ones, as the standard says
    data = bits.to_bytes(n // 8, "big").replace(b"\xff", b"\xff\x00")
    return table, data


def eighth_scale_scans(data: bytes) -> bytes | None:
    """``data``, a progressive JPEG, rewritten so that a 1/8-scale decode is cheap.

    The result decodes at 1/8 scale to the same pixels as ``data``; at other scales it does
    not (the AC coefficients of full-resolution components are gone). Returns None where
    nothing is gained or the file is not plainly understood: not a progressive Huffman (SOF2)
    JPEG ending with its end-of-image marker, restart intervals, no AC scan of a
    full-resolution component. Every other segment is kept in order (tables, EXIF, ICC).
    """
    if data[:2] != b"\xff\xd8":
        return None
    full: set[int] | None = None  # the components sampled at full resolution
    blocks = 0  # 8x8 blocks in each of them
    ac: dict[int, bytes] = {}  # the AC Huffman tables in force, by slot
    out = [data[:2]]
    emptied: set[int] = set()  # the components whose AC scans are replaced
    pos, n = 2, len(data)
    while pos < n:
        if data[pos] != 0xFF:
            return None
        while pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= n:
            return None
        marker = data[pos + 1]
        if marker == EOI:
            out.append(b"\xff\xd9")
            return b"".join(out) if emptied else None
        if pos + 4 > n:
            return None
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if end > n or end < pos + 4:
            return None
        body = data[pos + 4 : end]
        if marker in _OTHER_SOF:
            return None
        if marker == DRI and int.from_bytes(body[:2], "big"):
            return None
        if marker == DHT:
            tables = _ac_tables(body)
            if tables is None:
                return None
            ac.update(tables)
        if marker == SOF2:
            if len(body) < 6 or len(body) < 6 + 3 * body[5] or body[5] == 0:
                return None
            height, width, count = (
                int.from_bytes(body[1:3], "big"),
                int.from_bytes(body[3:5], "big"),
                body[5],
            )
            comps = [body[6 + 3 * k : 9 + 3 * k] for k in range(count)]
            hmax, vmax = max(c[1] >> 4 for c in comps), max(c[1] & 15 for c in comps)
            if height == 0 or width == 0 or hmax == 0 or vmax == 0:
                return None
            full = {c[0] for c in comps if c[1] >> 4 == hmax and c[1] & 15 == vmax}
            blocks = -(-width // 8) * -(-height // 8)
        if marker == SOS:
            if full is None or not body:
                return None
            count = body[0]
            if len(body) != 2 * count + 4:
                return None
            component, slot, first = body[1], body[2] & 15, body[2 * count + 1]
            scan_end = _scan_end(data, end)
            if scan_end < 0:
                return None
            if first > 0 and count == 1 and component in full:
                if component not in emptied:  # one scan for the whole band, where the first was
                    emptied.add(component)
                    table, entropy = _empty_scan(blocks, slot)
                    header = bytes((1, component, slot, 1, 63, 0))
                    out += [_segment(DHT, table), _segment(SOS, header), entropy]
                    if slot in ac:  # later scans decode with the file's own table again
                        out.append(_segment(DHT, ac[slot]))
            else:
                out.append(data[pos:scan_end])
            pos = scan_end
            continue
        out.append(data[pos:end])
        pos = end
    return None
