#!/usr/bin/env python3
"""Extract Jane Austen's six novels as plain text from the R package janeaustenr.

usage: austen_extract.py DATA_DIR OUT_DIR
    DATA_DIR  the package's data folder (…/site-library/janeaustenr/data, holding Rdata.rdx/.rdb)
    OUT_DIR   gets one <name>.txt per novel (emma, mansfieldpark, northangerabbey, persuasion,
              prideprejudice, sensesensibility): the R character vector's elements (one per line of the
              Project Gutenberg text, "" for blank lines) joined with "\n", plus a final "\n", UTF-8.

Pure standard library (no R needed). Format notes:
  * Rdata.rdx is an RDS file (gzip of an R serialisation) holding list(variables=, references=,
    compressed=); `variables` is a named list of c(offset, length) integer pairs into Rdata.rdb.
  * Each Rdata.rdb record is a 4-byte big-endian uncompressed length followed by a zlib stream
    (compressed=TRUE); for compressed=2/3 a 5th type byte follows the length ('Z' zlib, '2' bzip2,
    'X' xz, '0' stored).
  * The payload is R's XDR serialisation (format version 2 or 3): "X\\n", versions, then items, each
    an int of flags (type = flags & 0xff, has-attributes bit 9, has-tag bit 10, reference index in
    the upper bits of REFSXP) followed by type-specific data. Only the parts needed for data objects
    (vectors, pairlists, symbols, references, environments-as-references) are implemented; anything
    else raises an error naming the SEXP type.
"""
import bz2
import gzip
import lzma
import os
import struct
import sys
import zlib

NOVELS = ["emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility"]

# SEXP types
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP = 7, 8, 9, 10
INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 13, 14, 15, 16, 17
VECSXP, EXPRSXP, RAWSXP, S4SXP = 19, 20, 24, 25
# serialisation pseudo-types
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, EMPTYENV_SXP, BASEENV_SXP = 247, 242, 241
ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 240, 239, 238

NA_INTEGER = -(2 ** 31)


class RSym:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return "RSym(%r)" % self.name


class RObj:
    """A decoded R value: .type (SEXP type), .value (python value), .attr (dict name -> RObj)."""

    def __init__(self, typ, value, attr=None):
        self.type, self.value, self.attr = typ, value, attr or {}

    def names(self):
        n = self.attr.get("names")
        return n.value if n is not None else None


class Reader:
    def __init__(self, data):
        self.d, self.p, self.refs = data, 0, []

    def bytes(self, n):
        if self.p + n > len(self.d):
            raise ValueError("truncated R serialisation")
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def int(self):
        return struct.unpack(">i", self.bytes(4))[0]

    def length(self):
        n = self.int()
        if n == -1:  # long vector: two ints
            hi, lo = self.int(), self.int()
            n = (hi << 32) | (lo & 0xFFFFFFFF)
        return n

    def header(self):
        fmt = self.bytes(2)
        if fmt != b"X\n":
            raise ValueError("not an XDR R serialisation (format %r)" % fmt)
        version = self.int()
        self.int()  # writer R version
        self.int()  # minimal reader R version
        if version == 3:
            n = self.int()
            self.bytes(n)  # native encoding name
        elif version != 2:
            raise ValueError("unsupported serialisation version %d" % version)

    def charsxp(self, flags):
        n = self.int()
        if n == -1:
            return None  # NA_character_
        raw = self.bytes(n)
        levels = flags >> 12
        if levels & (1 << 2):  # LATIN1
            return raw.decode("latin-1")
        return raw.decode("utf-8", errors="surrogateescape")

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))
        if t == NILVALUE_SXP:
            return None
        if t in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP):
            return RObj(t, None)
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.int()
            return self.refs[idx - 1]
        if t == PERSISTSXP:
            v = self.stringvec()
            obj = RObj(t, v)
            self.refs.append(obj)
            return obj
        if t == SYMSXP:
            c = self.item()  # a CHARSXP
            sym = RSym(c.value if isinstance(c, RObj) else c)
            self.refs.append(sym)
            return sym
        if t in (PACKAGESXP, NAMESPACESXP):
            obj = RObj(t, self.stringvec())
            self.refs.append(obj)
            return obj
        if t == ENVSXP:
            self.int()  # locked
            env = RObj(ENVSXP, {})
            self.refs.append(env)
            enclos = self.item()
            frame = self.item()
            hashtab = self.item()
            attr = self.item()
            env.value = {"enclos": enclos, "frame": frame, "hashtab": hashtab}
            env.attr = attr
            return env
        if t in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
            # a pairlist: iterate over the CDR chain instead of recursing
            cells, attr0 = [], None
            while True:
                attr = self.attrs_pairlist() if has_attr else {}
                if attr0 is None:
                    attr0 = attr
                tag = self.item() if has_tag else None
                car = self.item()
                cells.append((tag, car))
                flags = self.int()
                t2 = flags & 0xFF
                if t2 in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
                    has_attr = bool(flags & (1 << 9))
                    has_tag = bool(flags & (1 << 10))
                    continue
                # CDR is not a pairlist cell: push the flags back and read it as an item
                self.p -= 4
                tail = self.item()
                if tail is not None:
                    cells.append((None, tail))
                break
            return RObj(LISTSXP if t in (LISTSXP, ATTRLISTSXP) else t, cells, attr0)
        if t == CHARSXP:
            return RObj(CHARSXP, self.charsxp(flags))
        if t in (LGLSXP, INTSXP):
            n = self.length()
            v = list(struct.unpack(">%di" % n, self.bytes(4 * n))) if n else []
            val = v
        elif t == REALSXP:
            n = self.length()
            val = list(struct.unpack(">%dd" % n, self.bytes(8 * n))) if n else []
        elif t == CPLXSXP:
            n = self.length()
            f = struct.unpack(">%dd" % (2 * n), self.bytes(16 * n)) if n else ()
            val = [complex(f[2 * i], f[2 * i + 1]) for i in range(n)]
        elif t == STRSXP:
            n = self.length()
            val = []
            for _ in range(n):
                c = self.item()
                val.append(c.value if isinstance(c, RObj) else c)
        elif t in (VECSXP, EXPRSXP):
            n = self.length()
            val = [self.item() for _ in range(n)]
        elif t == RAWSXP:
            n = self.length()
            val = self.bytes(n)
        elif t == S4SXP:
            val = None
        elif t == ALTREP_SXP:
            info = self.item()
            state = self.item()
            attr = self.item()
            return RObj(ALTREP_SXP, (info, state), {"_pairlist": attr})
        else:
            raise ValueError("unsupported SEXP type %d in R serialisation" % t)
        obj = RObj(t, val)
        if has_attr:
            obj.attr = self.attrs_pairlist()
        return obj

    def attrs_pairlist(self):
        pl = self.item()
        out = {}
        if isinstance(pl, RObj) and pl.type == LISTSXP:
            for tag, val in pl.value:
                out[tag.name if isinstance(tag, RSym) else str(tag)] = val
        return out

    def stringvec(self):
        if self.int() != 0:
            raise ValueError("bad string vector in PERSISTSXP/PACKAGESXP")
        n = self.int()
        out = []
        for _ in range(n):
            c = self.item()
            out.append(c.value if isinstance(c, RObj) else c)
        return out


def unserialize(data):
    r = Reader(data)
    r.header()
    return r.item()


def decompress_record(buf, ctype):
    """One lazy-load database record: 4-byte BE length (+ type byte for ctype 2/3) + payload."""
    n = struct.unpack(">I", buf[:4])[0]
    if ctype in (2, 3):
        kind, body = buf[4:5], buf[5:]
        if kind == b"Z":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"X":
            out = lzma.decompress(body)
        elif kind == b"0":
            out = body
        else:
            raise ValueError("unknown record compression %r" % kind)
    else:
        out = zlib.decompress(buf[4:])
    if len(out) != n:
        raise ValueError("record length mismatch: header %d, got %d" % (n, len(out)))
    return out


def read_rdx(path):
    raw = open(path, "rb").read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    elif raw[:3] == b"BZh":
        raw = bz2.decompress(raw)
    elif raw[:6] == b"\xfd7zXZ\x00":
        raw = lzma.decompress(raw)
    elif raw[:2] != b"X\n":  # maybe the 4-byte-length + zlib form
        raw = decompress_record(raw, 1)
    idx = unserialize(raw)
    parts = dict(zip(idx.names(), idx.value))
    var = parts["variables"]
    comp = parts.get("compressed")
    ctype = 1
    if comp is not None and comp.value:
        ctype = comp.value[0] if comp.type == INTSXP or comp.type == REALSXP else (1 if comp.value[0] else 0)
        ctype = int(ctype)
    table = {}
    for name, pos in zip(var.names(), var.value):
        off, ln = int(pos.value[0]), int(pos.value[1])
        table[name] = (off, ln)
    return table, ctype


def main(argv):
    if len(argv) != 3:
        sys.stderr.write(__doc__)
        return 2
    data_dir, out_dir = argv[1], argv[2]
    rdx, rdb = os.path.join(data_dir, "Rdata.rdx"), os.path.join(data_dir, "Rdata.rdb")
    table, ctype = read_rdx(rdx)
    missing = [n for n in NOVELS if n not in table]
    if missing:
        raise SystemExit("austen_extract: %s lacks %s (has %s)" % (rdx, missing, sorted(table)))
    os.makedirs(out_dir, exist_ok=True)
    with open(rdb, "rb") as f:
        db = f.read()
    for name in NOVELS:
        off, ln = table[name]
        obj = unserialize(decompress_record(db[off:off + ln], ctype))
        if not isinstance(obj, RObj) or obj.type != STRSXP:
            raise SystemExit("austen_extract: %s is not a character vector" % name)
        text = "\n".join("" if s is None else s for s in obj.value) + "\n"
        dst = os.path.join(out_dir, name + ".txt")
        tmp = dst + ".tmp"
        with open(tmp, "w", encoding="utf-8", newline="\n") as g:
            g.write(text)
        os.replace(tmp, dst)
        print("austen_extract: %-18s %6d lines %8d chars -> %s" % (name, len(obj.value), len(text), dst))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
