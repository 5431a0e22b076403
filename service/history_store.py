"""Compact behaviour histories: an item dictionary and one packed string per user.

A history is one Redis string per user: a header (format version, the item dictionary's
generation) and then one fixed-width record per event, sorted by (timestamp, item code):

    header  ">BI"    version 1, generation (uint32)
    record  ">HII"   timestamp high 16 bits, low 32 bits (48 bits in all), item code (uint32)

Item ids are arbitrary strings, so they are stored once per deployment in the item
dictionary (one hash: ``=<id>`` -> code and ``#<code>`` -> id, plus ``gen`` and ``next``),
which assigns each new id the next code, once, atomically. A code never changes while its
dictionary lives, so every worker may keep the codes it has used in memory
(``ItemCodes``). Should the dictionary be lost (a flushed or emptied Redis), the next
writer creates a new one with another random generation; a history whose generation is
not the dictionary's then names codes of a dictionary that no longer exists, and is read
as empty rather than as the wrong items.

Merging, de-duplicating, ordering and capping happen in one Lua script per user
(``APPEND_SCRIPT``), so concurrent writers lose nothing; the dictionary step is another
script, so that each script touches one Redis Cluster hash slot only. The same script
converts a user's history from the old layout (a sorted set of ``"ts:item"`` members),
which reads keep merging in until it is converted (``service.migrate_histories``).

``merge_records`` is the script's rule in Python: the in-memory store follows it and the
tests hold the script to it.
"""

from __future__ import annotations

import struct
import time

import numpy as np

FORMAT_VERSION = 1
HEADER = struct.Struct(">BI")  # format version, item dictionary generation
RECORD = np.dtype([("ts_high", ">u2"), ("ts_low", ">u4"), ("code", ">u4")])
RECORD_STRUCT = struct.Struct(">HII")  # the same record, for packing
RECORD_SIZE = RECORD.itemsize  # 10 bytes
MEMBER_LENGTH = struct.Struct(">I")
MAX_TS = 2**48 - 1
MAX_CODE = 2**32 - 1
# A worker re-reads the dictionary's generation at least this often before writing from
# its remembered codes alone: it bounds how long a worker that missed a lost dictionary
# keeps writing codes nobody else can read.
GENERATION_CHECK_SECONDS = 5.0

# Replies of APPEND_SCRIPT besides a count of added events.
NEEDS_LEGACY = -1  # the old layout's key exists: read it and pass it along
GENERATION_MISMATCH = -2  # the stored history was written under another generation


def pack_records(events: list[tuple[int, int]]) -> bytes:
    """Records of (ts, code) pairs, sorted and without repeats, as the script expects."""
    # struct, not numpy: an append packs one event or a few, where numpy's set-up costs
    # several times the work.
    pack = RECORD_STRUCT.pack
    return b"".join([pack(ts >> 32, ts & 0xFFFFFFFF, code) for ts, code in sorted(set(events))])


def unpack_records(body: bytes) -> tuple[list[int], list[int]]:
    """Timestamps and codes of the records in ``body`` (a history without its header)."""
    records = np.frombuffer(body, dtype=RECORD, count=len(body) // RECORD_SIZE)
    ts = (records["ts_high"].astype(np.int64) << 32) | records["ts_low"].astype(np.int64)
    return ts.tolist(), records["code"].tolist()


def pack_members(members: list[bytes]) -> bytes:
    """The old layout's members as one argument of APPEND_SCRIPT: each with its length.

    One argument rather than one per member: redis-py packs each argument in Python,
    which made a conversion's call cost a millisecond of the client's CPU."""
    return b"".join([MEMBER_LENGTH.pack(len(member)) + member for member in members])


def pack_history(generation: int, body: bytes) -> bytes:
    """A stored history: the header, then the records."""
    return HEADER.pack(FORMAT_VERSION, generation) + body


def merge_records(body: bytes, legacy: bytes, new: bytes, cap: int) -> tuple[bytes, int]:
    """What APPEND_SCRIPT stores and answers: ``legacy`` and ``new`` records merged into
    ``body``, repeats dropped, the newest ``cap`` kept; and how many of ``new`` were not
    there before and are kept."""
    stored = set(zip(*unpack_records(body), strict=True)) | set(
        zip(*unpack_records(legacy), strict=True)
    )
    fresh = set(zip(*unpack_records(new), strict=True)) - stored
    kept = sorted(stored | fresh)[-cap:]
    return pack_records(kept), len(fresh.intersection(kept))


class ItemCodes:
    """The dictionary entries one worker has used, both ways, for one generation.

    Bounded by ``capacity`` entries: when full, the oldest eighth is forgotten (insertion
    order; no per-hit bookkeeping on the read path).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.generation: int | None = None
        self.checked_at = float("-inf")
        self.code_of: dict[str, int] = {}
        self.item_of: dict[int, str] = {}

    def start(self, generation: int) -> None:
        """Adopt the dictionary's generation (confirmed now); forget another one's codes."""
        if generation != self.generation:
            self.code_of.clear()
            self.item_of.clear()
            self.generation = generation
        self.checked_at = time.monotonic()

    def fresh(self) -> bool:
        """Whether the generation was confirmed recently enough to write from memory."""
        return (
            self.generation is not None
            and time.monotonic() - self.checked_at < GENERATION_CHECK_SECONDS
        )

    def remember(self, item: str, code: int) -> None:
        if self.capacity <= 0 or item in self.code_of:
            return
        if len(self.code_of) >= self.capacity:
            oldest = list(self.code_of.items())[: max(1, self.capacity // 8)]
            for old_item, old_code in oldest:
                del self.code_of[old_item]
                self.item_of.pop(old_code, None)
        self.code_of[item] = code
        self.item_of[code] = item


# KEYS[1]: the item dictionary. ARGV[1]: the generation of a dictionary created now;
# ARGV[2..]: item ids. Answers the generation, then each id's code.
ASSIGN_SCRIPT = """#!lua
local dictionary = KEYS[1]
local generation = redis.call('HGET', dictionary, 'gen')
if not generation then
  -- No dictionary (or one without its generation): start a new one; any codes stored in
  -- histories belong to the old one, which their generation tells apart.
  redis.call('DEL', dictionary)
  redis.call('HSET', dictionary, 'gen', ARGV[1], 'next', 0)
  generation = ARGV[1]
end
local answer = {tonumber(generation)}
for i = 2, #ARGV do
  local code = redis.call('HGET', dictionary, '=' .. ARGV[i])
  if not code then
    code = redis.call('HINCRBY', dictionary, 'next', 1)
    if code > 4294967295 then
      return redis.error_reply('recserve: the item dictionary is full (2^32 - 1 codes)')
    end
    redis.call('HSET', dictionary, '=' .. ARGV[i], code, '#' .. code, ARGV[i])
  end
  answer[#answer + 1] = tonumber(code)
end
return answer
"""

# KEYS[1]: the user's history, KEYS[2]: the old layout's key of the same user (one hash
# slot: KEYS[1] names KEYS[2] as its hash tag).
# ARGV[1]: generation of the codes passed; ARGV[2]: cap; ARGV[3]: generation of a stored
# history to discard, or ''; ARGV[4]: how many members of KEYS[2] the caller read (-1:
# none read); ARGV[5]: their records; ARGV[6]: the new records; ARGV[7]: the members
# read, in ZRANGE order, as ``pack_members`` joins them. Records are sorted by (ts, code)
# and distinct.
# Answers {added} or {NEEDS_LEGACY} or {GENERATION_MISMATCH, stored generation}; nothing
# is written unless it answers a count.
APPEND_SCRIPT = """#!lua
local R = 10
local generation = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local discard = tonumber(ARGV[3])
local legacy_read = tonumber(ARGV[4])
local legacy = ARGV[5]
local new = ARGV[6]

local function at(s, i)
  local high, low, code = struct.unpack('>HII', s, i * R + 1)
  return high * 4294967296 + low, code
end

-- Merge sorted distinct records `add` into sorted `body`: the merged records and the
-- positions (0-based, in them) of the records of `add` that were not in `body`.
local function merge(body, add)
  local n = #body / R
  local pieces, inserted = {}, {}
  if #add == 0 then return body, inserted end
  local copied, lo = 0, 0
  for j = 0, #add / R - 1 do
    local ts, code = at(add, j)
    local hi = n
    while lo < hi do
      local mid = math.floor((lo + hi) / 2)
      local mts, mcode = at(body, mid)
      if mts < ts or (mts == ts and mcode < code) then lo = mid + 1 else hi = mid end
    end
    local repeated = false
    if lo < n then
      local bts, bcode = at(body, lo)
      repeated = bts == ts and bcode == code
    end
    if not repeated then
      pieces[#pieces + 1] = string.sub(body, copied * R + 1, lo * R)
      pieces[#pieces + 1] = string.sub(add, j * R + 1, (j + 1) * R)
      copied = lo
      inserted[#inserted + 1] = lo + #inserted
    end
  end
  pieces[#pieces + 1] = string.sub(body, copied * R + 1)
  return table.concat(pieces), inserted
end

local has_legacy = redis.call('EXISTS', KEYS[2]) == 1
if has_legacy then
  -- Convert only from exactly what is there, so that no member written meanwhile by a
  -- worker of the old layout is dropped.
  if legacy_read < 0 then return {-1} end
  local members = redis.call('ZRANGE', KEYS[2], 0, -1)
  if #members ~= legacy_read then return {-1} end
  local joined = {}
  for i, member in ipairs(members) do joined[i] = struct.pack('>I4', #member) .. member end
  if table.concat(joined) ~= ARGV[7] then return {-1} end
else
  -- Converted by another writer since the caller read it: already merged.
  legacy = ''
end

local stored_length = redis.call('STRLEN', KEYS[1])
local stored = 0  -- records of the stored history that stay in it
local changed = has_legacy
if stored_length > 0 then
  local version, stored_generation = struct.unpack('>BI', redis.call('GETRANGE', KEYS[1], 0, 4))
  if version ~= 1 then
    return redis.error_reply('recserve: a history of format ' .. version .. ' (this is 1)')
  end
  if stored_generation == generation then
    stored = (stored_length - 5) / R
  elseif stored_generation == discard then
    changed = true  -- its codes belong to a dictionary that no longer exists
  else
    return {-2, stored_generation}
  end
end
local header = struct.pack('>BI', 1, generation)

-- The usual write: no old layout to convert and every new event newer than the newest
-- stored. It reads only what it keeps (each copy of a history costs microseconds here).
local m = #new / R
local newest_first = not has_legacy and m > 0
if newest_first and stored > 0 then
  local last_ts, last_code = at(redis.call('GETRANGE', KEYS[1], -R, -1), 0)
  local first_ts, first_code = at(new, 0)
  newest_first = last_ts < first_ts or (last_ts == first_ts and last_code < first_code)
end
if newest_first then
  local drop = math.max(0, stored + m - cap)
  local kept = ''
  if drop < stored then kept = redis.call('GETRANGE', KEYS[1], 5 + drop * R, -1) end
  local dropped_new = math.max(0, drop - stored)
  redis.call('SET', KEYS[1], header .. kept .. string.sub(new, dropped_new * R + 1))
  return {m - dropped_new}
end

local body = ''
if stored > 0 then body = string.sub(redis.call('GET', KEYS[1]), 6) end
local inserted
body = merge(body, legacy)
body, inserted = merge(body, new)
local drop = math.max(0, #body / R - cap)
local added = 0
for _, position in ipairs(inserted) do
  if position >= drop then added = added + 1 end
end
if #inserted > 0 or drop > 0 then changed = true end
if changed then
  if #body / R > drop then
    redis.call('SET', KEYS[1], header .. string.sub(body, drop * R + 1))
  else
    redis.call('DEL', KEYS[1])
  end
  if has_legacy then redis.call('DEL', KEYS[2]) end
end
return {added}
"""

# KEYS as APPEND_SCRIPT's. Answers {history or nil} or, while the old layout's key
# exists, {history or nil, its members}. Read-only, so a replica may answer it.
READ_SCRIPT = """#!lua flags=no-writes
local stored = redis.call('GET', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {stored, redis.call('ZRANGE', KEYS[2], 0, -1)}
end
return {stored}
"""
