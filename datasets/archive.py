"""Where the encoded images of a user's data set lie: the members of a zip, or the files of a folder.

Both keep a compact index (`NameTable`: one bytes blob of the names and numpy offsets, plus numpy
arrays of where each member lies), not one Python object per image, and read one item's bytes
when asked. Why not `zipfile.ZipFile`: it holds a `ZipInfo` object and a dict entry per member
(~0.5 KB each, 600 MB for ImageNet's 1.28 M images, in every DataLoader worker), and its file
handle must not be shared across a fork. Here a zip's central directory (PKWARE APPNOTE 4.3.12,
zip64 4.3.14-15) is parsed once into arrays; each process opens the file itself, lazily (a
worker's first read), and reads a member with one `os.pread`: local header plus data, CRC-checked.
"""
import os
import struct
import zlib
from array import array
from pathlib import Path

import numpy as np

from cmt.errors import FileFormatError

_EOCD = struct.Struct("<4s4H2LH")                # end of central directory record
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s6H3L5H2L")          # central directory file header
_LOCAL = struct.Struct("<4s5H3L2H")              # local file header
_STORED, _DEFLATED = 0, 8
# What a member's local header may carry beyond the central directory's name (its extra field):
# read along with the data in one pread, a second read only when it is longer.
_LOCAL_SLACK = 64


class NameTable:
    """Strings in one UTF-8 blob with int64 offsets: ~1/3 the memory of a list of str, and no
    per-item objects whose reference counts a forked worker would copy pages for."""

    def __init__(self, names=(), blob=None, offsets=None):
        if blob is None:
            encoded = [name.encode("utf-8") for name in names]
            offsets = np.zeros(len(encoded) + 1, np.int64)
            np.cumsum([len(item) for item in encoded], out=offsets[1:])
            blob = b"".join(encoded)
        self.blob, self.offsets = bytes(blob), np.asarray(offsets, np.int64)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, index):
        return self.raw(index).decode("utf-8")

    def raw(self, index):
        """Name `index` as UTF-8 bytes (which sort as the names do)."""
        return self.blob[self.offsets[index]:self.offsets[index + 1]]

    def __iter__(self):
        return (self[index] for index in range(len(self)))


class _Files:
    """What zip members and folder files share: a per-process file handle and the names."""

    def __getstate__(self):   # a worker opens its own handle (not one shared across the fork)
        return {**self.__dict__, "_fd": None, "_pid": None}

    def _descriptor(self, path):
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(path, os.O_RDONLY), os.getpid()
        return self._fd

    def where(self, index):
        """The item for messages: `zip: member NAME` or the file's path."""
        raise NotImplementedError


def _parse_central_directory(path, handle, keep, extras):
    """`(names, table, others, in_order)` of the members whose name `keep(name)` accepts: their names
    (a `NameTable`), an int64 table of (header offset, compressed size, size, method, crc) rows in
    the directory's order, whether that order is sorted by name; and `others`, {name: row} of the
    members named in `extras` (dataset.json). Built without a Python object per member, so that
    opening a large set costs little more than its index."""
    size = os.fstat(handle.fileno()).st_size
    tail_size = min(size, _EOCD.size + 65535)
    handle.seek(size - tail_size)
    tail = handle.read(tail_size)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < _EOCD.size:
        raise FileFormatError(f"{path}: not a readable zip file (no end of central directory record; truncated?)")
    _, _, _, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    cd_end = size - tail_size + at
    locator = at - _EOCD64_LOCATOR.size
    if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
        handle.seek(cd_end - _EOCD64_LOCATOR.size - _EOCD64.size)
        record = handle.read(_EOCD64.size)
        if len(record) == _EOCD64.size and record[:4] == b"PK\x06\x06":
            fields = _EOCD64.unpack(record)
            entries, cd_size, cd_offset = fields[7], fields[8], fields[9]
            cd_end -= _EOCD64_LOCATOR.size + _EOCD64.size
    concat = cd_end - cd_size - cd_offset   # bytes before the archive (a self-extractor's stub), as zipfile
    if concat < 0:
        raise FileFormatError(f"{path}: its central directory lies outside the file (truncated zip?)")
    handle.seek(cd_offset + concat)
    blob, name_ends, others = bytearray(), array("q"), {}
    columns = array("q")   # offset, compressed size, size, method, crc of each member kept, in turn
    previous, in_order = b"", True
    buffer, position = b"", 0
    for _ in range(entries):
        if len(buffer) - position < _CENTRAL.size + 65535 * 3:
            buffer = buffer[position:] + handle.read(1 << 20)
            position = 0
        if len(buffer) - position < _CENTRAL.size or buffer[position:position + 4] != b"PK\x01\x02":
            raise FileFormatError(f"{path}: the central directory is damaged or cut short (truncated zip?)")
        (_, _, _, flags, method, _, _, crc, csize, usize, name_length, extra_length, comment_length, _, _, _,
         offset) = _CENTRAL.unpack_from(buffer, position)
        start = position + _CENTRAL.size
        raw_name = buffer[start:start + name_length]
        extra = buffer[start + name_length:start + name_length + extra_length]
        position = start + name_length + extra_length + comment_length
        name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        if 0xFFFFFFFF in (usize, csize, offset):
            usize, csize, offset = _zip64_sizes(extra, usize, csize, offset)
        if flags & 0x1:
            raise FileFormatError(f"{path}: member {name} is encrypted; cmt reads plain zips (EDM's dataset tool)")
        if keep(name):
            if method not in (_STORED, _DEFLATED):
                raise FileFormatError(f"{path}: member {name} uses compression method {method}; cmt reads stored "
                                      "or deflated members (what EDM's dataset tool and zip -r write)")
            encoded = raw_name if flags & 0x800 or raw_name.isascii() else name.encode("utf-8")
            in_order = in_order and previous <= encoded
            previous = encoded
            blob += encoded
            name_ends.append(len(blob))
            columns.extend((offset + concat, csize, usize, method, crc))
        elif name in extras:
            others[name] = (offset + concat, csize, usize, method, crc)
    offsets = np.zeros(len(name_ends) + 1, np.int64)
    offsets[1:] = np.frombuffer(name_ends, np.int64)
    table = np.frombuffer(columns, np.int64).reshape(-1, 5)
    return NameTable(blob=blob, offsets=offsets), table, others, in_order


def _zip64_sizes(extra, usize, csize, offset):
    """The zip64 extended information extra field (id 1) holds the values stored as 0xFFFFFFFF, in this order."""
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, at)
        if kind == 1:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
            if usize == 0xFFFFFFFF:
                usize = values.pop(0)
            if csize == 0xFFFFFFFF:
                csize = values.pop(0)
            if offset == 0xFFFFFFFF:
                offset = values.pop(0)
            break
        at += 4 + length
    return usize, csize, offset


class ZipMembers(_Files):
    """The members of a zip that `keep(name)` accepts, sorted by name (as EDM's loaders sort them)."""

    def __init__(self, path, keep, extras=()):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                names, table, self.others, in_order = _parse_central_directory(self.path, handle, keep, set(extras))
        except OSError as error:
            raise FileFormatError(f"{self.path}: cannot read it ({error.strerror or error})") from None
        if not in_order:   # EDM's dataset tool writes its members sorted; anything else is sorted here
            order = np.array(sorted(range(len(names)), key=names.raw), np.int64)
            names = NameTable(blob=b"".join(names.raw(k) for k in order),
                              offsets=np.concatenate([[0], np.cumsum(np.diff(names.offsets)[order])]))
            table = table[order]
        self.names = names
        self.offset, self.csize, self.size = table[:, 0], table[:, 1], table[:, 2]   # views of one table
        self.method, self.crc = table[:, 3].astype(np.uint8), table[:, 4].astype(np.uint32)
        self._fd = self._pid = None

    def __len__(self):
        return len(self.names)

    def where(self, index):
        return f"{self.path}: member {self.names[index]}"

    def _member(self, name, offset, csize, size, method, crc, head=None):
        """The member's bytes (the first `head` decompressed bytes only, unchecked, if given)."""
        fd = self._descriptor(self.path)
        name_length = len(name.encode("utf-8"))
        wanted = csize if head is None or method == _DEFLATED else min(csize, head)
        if method == _DEFLATED and head is not None:
            wanted = min(csize, 4 * head + 64)
        data = os.pread(fd, _LOCAL.size + name_length + _LOCAL_SLACK + wanted, offset)
        if len(data) < _LOCAL.size or data[:4] != b"PK\x03\x04":
            raise FileFormatError(f"{self.path}: member {name}: no local header at offset {offset} (damaged zip?)")
        fields = _LOCAL.unpack_from(data)
        start = _LOCAL.size + fields[9] + fields[10]
        body = data[start:start + wanted]
        if len(body) < wanted:
            body += os.pread(fd, wanted - len(body), offset + start + len(body))
        if len(body) < wanted:
            raise FileFormatError(f"{self.path}: member {name} is cut short ({len(body)} of {csize} bytes; "
                                  "truncated zip?)")
        if method == _DEFLATED:
            try:
                if head is not None:
                    return zlib.decompressobj(-15).decompress(body, head)
                body = zlib.decompress(body, -15, size)
            except zlib.error as error:
                raise FileFormatError(f"{self.path}: member {name} does not inflate ({error})") from None
        if head is not None:
            return body
        if len(body) != size or zlib.crc32(body) != crc:
            raise FileFormatError(f"{self.path}: member {name} is corrupt (its CRC-32 or size differs from the "
                                  "zip's directory)")
        return body

    def read(self, index):
        """The bytes of member `index`, CRC-checked (a FileFormatError naming it otherwise)."""
        return self._member(self.names[index], int(self.offset[index]), int(self.csize[index]),
                            int(self.size[index]), int(self.method[index]), int(self.crc[index]))

    def head(self, index, count):
        """About the first `count` bytes of member `index` (decompressed), unchecked: for headers."""
        return self._member(self.names[index], int(self.offset[index]), int(self.csize[index]),
                            int(self.size[index]), int(self.method[index]), int(self.crc[index]), head=count)

    def probe(self, index, head, tail):
        """`(about the first head bytes, the last tail bytes or None)` of member `index`: two reads,
        for the header scan (a deflated member's tail is None: it would need inflating whole)."""
        offset, csize = int(self.offset[index]), int(self.csize[index])
        if self.method[index] != _STORED:
            return self.head(index, head), None
        fd = self._descriptor(self.path)
        data = os.pread(fd, _LOCAL.size + 2 * _LOCAL_SLACK + min(head, csize) + 256, offset)
        if len(data) < _LOCAL.size or data[:4] != b"PK\x03\x04":
            raise FileFormatError(f"{self.where(index)}: no local header at offset {offset} (damaged zip?)")
        start = _LOCAL.size + int.from_bytes(data[26:28], "little") + int.from_bytes(data[28:30], "little")
        first = data[start:start + min(head, csize)]
        if len(first) < min(head, csize):
            first = os.pread(fd, min(head, csize), offset + start)
        return first, (os.pread(fd, tail, offset + start + csize - tail) if csize >= tail else None)

    def data_offset(self, index):
        """Where member `index`'s (compressed) bytes start in the file."""
        header = os.pread(self._descriptor(self.path), _LOCAL.size, int(self.offset[index]))
        if len(header) < _LOCAL.size or header[:4] != b"PK\x03\x04":
            raise FileFormatError(f"{self.path}: member {self.names[index]}: no local header (damaged zip?)")
        fields = _LOCAL.unpack(header)
        return int(self.offset[index]) + _LOCAL.size + fields[9] + fields[10]

    def read_other(self, name):
        """The bytes of a member that is not an item (dataset.json), or None if there is none."""
        if name not in self.others:
            return None
        return self._member(name, *self.others[name])


class FolderFiles(_Files):
    """The files under `root` that `keep(relative name)` accepts, recursively, sorted by relative
    path (with '/' separators: the names EDM's dataset.json uses)."""

    def __init__(self, root, keep):
        self.path = Path(root)
        names = []

        def walk(folder, prefix):
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir():
                        walk(entry.path, prefix + entry.name + "/")
                    elif keep(entry.name):
                        names.append(prefix + entry.name)

        walk(self.path, "")
        names.sort()
        self.names = NameTable(names)
        self._fd = self._pid = None

    def __len__(self):
        return len(self.names)

    def where(self, index):
        return str(self.path / self.names[index])

    def read(self, index):
        path = self.path / self.names[index]
        try:
            with open(path, "rb", buffering=0) as file:
                return file.read()
        except OSError as error:
            raise FileFormatError(f"{path}: cannot read it ({error.strerror or error})") from None

    def head(self, index, count):
        path = self.path / self.names[index]
        try:
            with open(path, "rb", buffering=0) as file:
                return file.read(count)
        except OSError as error:
            raise FileFormatError(f"{path}: cannot read it ({error.strerror or error})") from None

    def probe(self, index, head, tail):
        path = self.path / self.names[index]
        try:
            with open(path, "rb", buffering=0) as file:
                first = file.read(head)
                size = os.fstat(file.fileno()).st_size
                return first, (os.pread(file.fileno(), tail, size - tail) if size >= tail else None)
        except OSError as error:
            raise FileFormatError(f"{path}: cannot read it ({error.strerror or error})") from None

    def read_other(self, name):
        path = self.path / name
        return path.read_bytes() if path.is_file() else None
