-- Shared library of the operation scripts (scripts.py loads it once with every operation).
-- All money is integer tokens; Lua numbers are doubles, exact up to 2^53.
-- Time comes from the Redis server (TIME), never from the caller.
-- No function here reads KEYS or ARGV: each operation script binds its own to names at its top
-- (bind() below) and passes tables in; the argument lists (*_ARGV) mirror the typed objects of
-- src/quota_gw/decisions.py, field for field (tests/test_lua_interface.py checks they agree).

-- The globals the library uses, as locals. A Functions library reads a global through its
-- sandbox (the global table's __index: two lookups and a metamethod a read); an upvalue is one
-- read, and the hot path reads these hundreds of times a call. Loading a library sees none of
-- them (only redis.register_function), so init() (at the end of this file) takes them on an
-- operation's first call (scripts.py starts every operation with it).
local call, tonumber, tostring, ipairs, pairs, setmetatable, type, unpack, next
local insert, concat, sort, floor, max, min, ceil, format, sub, gmatch, match, json_encode, json_decode
local function take_globals()
  local G = _G
  call, tonumber, tostring, ipairs, pairs = G.redis.call, G.tonumber, G.tostring, G.ipairs, G.pairs
  setmetatable, type, unpack, next = G.setmetatable, G.type, G.unpack, G.next
  insert, concat, sort = G.table.insert, G.table.concat, G.table.sort
  floor, max, min, ceil = G.math.floor, G.math.max, G.math.min, G.math.ceil
  format, sub, gmatch, match = G.string.format, G.string.sub, G.string.gmatch, G.string.match
  json_encode, json_decode = G.cjson.encode, G.cjson.decode
end

-- Texts read back call after call (a period's end, a limit, a cost, holds_due, TIME's seconds)
-- as numbers: a table read instead of tonumber, which parses the text twice with strtod (~1,100
-- instructions). NUMBERS holds the texts of -1..99 (a nought held or left most often) and the
-- texts number_of() parsed, bounded by a count (then it starts again from the small ones; kept
-- small: every table the library keeps is walked by each garbage collection, a 1,000-entry one
-- measured ~600 instructions a call). A text that changes every call (a balance) is not
-- remembered: `text + 0` parses it once (the same conversion as tonumber's, for the integer
-- texts the scripts write).
-- The library's memos (texts that repeat, kept across calls: their parsed or made values) are
-- bounded: memo_put() puts one entry, after emptying the memo in place when it holds `most`
-- (what is needed again comes back; a memo keeps its table, so its readers index it plainly).
-- `refill`: what an emptied memo starts with again. The counts are kept beside the memos.
local MEMO_COUNTS = {}
local function memo_put(memo, most, key, value, refill)
  local n = MEMO_COUNTS[memo] or 0
  if n >= most then
    for k in next, memo do memo[k] = nil end
    if refill then refill(memo) end
    n = 0
  end
  memo[key] = value
  MEMO_COUNTS[memo] = n + 1
  return value
end

local NUMBERS = {}  -- text -> number; filled by init()
local SMALL_NUMBERS, DIGITS3 = {}, {}  -- filled by init(): n -> '<n>' (-1..1023), n -> '%03d' (0..999)
local function small_texts(t)
  for n = -1, 99 do t[SMALL_NUMBERS[n]] = n end
  return t
end
local function number_of(text)
  local n = tonumber(text)
  if n == nil then return nil end
  return memo_put(NUMBERS, 256, text, n, small_texts)
end

local function now_us()
  local t = call('TIME')
  local s = t[1]
  return (NUMBERS[s] or number_of(s)) * 1000000 + t[2]
end

-- TIME's reply {seconds, µs} as the text of the time in µs (fmt of now_us()): the µs padded to six digits.
local USEC_PAD = {'00000', '0000', '000', '00', '0', ''}
local function time_text(x)
  local us = x[2]
  return x[1] .. USEC_PAD[#us] .. us
end

-- An integer as text, for strings built in Lua (concatenating a number writes 1e+15), and for
-- the numbers the straight paths send Redis 7.0/7.1 (big_arg, below): redis.call writes a Lua
-- number as its digits, exactly up to 2^53 (the money range), but there with snprintf('%.17g')
-- (~2,700 instructions); the other operations send theirs as they are.
-- The small integers an answer or an event carries most (costs, rate-limit counts, -1 for none)
-- are made once: a table read instead of a format call (~1,300 instructions) each. A larger
-- whole number (a balance, a time in µs) is joined from groups of three digits made once, one
-- concatenation: a fifth of a format call.
local function fmt_large(n)
  -- Exact below 2^53 (the money range; µs until the year 2255): n % 1000 of such a double is exact.
  if n < 1000 or n >= 9007199254740992 or n % 1 ~= 0 then return format('%d', n) end
  local a = n % 1000; n = (n - a) / 1000
  if n < 1000 then return SMALL_NUMBERS[n] .. DIGITS3[a] end
  local b = n % 1000; n = (n - b) / 1000
  if n < 1000 then return SMALL_NUMBERS[n] .. DIGITS3[b] .. DIGITS3[a] end
  local c = n % 1000; n = (n - c) / 1000
  if n < 1000 then return SMALL_NUMBERS[n] .. DIGITS3[c] .. DIGITS3[b] .. DIGITS3[a] end
  local d = n % 1000; n = (n - d) / 1000
  if n < 1000 then return SMALL_NUMBERS[n] .. DIGITS3[d] .. DIGITS3[c] .. DIGITS3[b] .. DIGITS3[a] end
  local e = n % 1000; n = (n - e) / 1000
  return SMALL_NUMBERS[n] .. DIGITS3[e] .. DIGITS3[d] .. DIGITS3[c] .. DIGITS3[b] .. DIGITS3[a]
end
local function fmt(n)
  return SMALL_NUMBERS[n] or fmt_large(n)
end
-- A whole number as a redis.call argument, past SMALL_NUMBERS (`SMALL_NUMBERS[n] or big_arg(n)`):
-- Redis 7.2 and later (Valkey too) write a Lua number as its digits (ll2string, a few hundred
-- instructions), so it goes as it is; Redis 7.0 and 7.1 write it through snprintf('%.17g')
-- (~2,700), so fmt_large makes its text. Chosen by init() from the server's version.
local big_arg
local function as_is(n)
  return n
end

-- Names the positional values of KEYS or ARGV: bind(ARGV, {'event_id', 'org'}).event_id.
-- The hot lists (the gate's and settling's) have a compiled binder (BINDERS, made by init()):
-- one table constructor, sized once, instead of a table grown name by name (a rehash at every
-- power of two was most of a bind).
local BINDERS = {}
local function bind(values, names)
  local binder = BINDERS[names]
  if binder then return binder(values) end
  local t = {}
  for i, name in ipairs(names) do t[name] = values[i] end
  return t
end

-- A function that returns {names[1] = v[1], ...; spare[1] = nil, ...}: the spare fields (those
-- the caller adds later) are sized in with the rest, so adding them grows nothing.
local function compile_binder(names, spare)
  local parts = {}
  for i, name in ipairs(names) do parts[i] = name .. ' = v[' .. i .. ']' end
  for _, name in ipairs(spare or {}) do parts[#parts + 1] = name .. ' = nil' end
  return _G.loadstring('return function(v) return {' .. concat(parts, ', ') .. '} end')()
end

-- The gate's arguments (check, consume, reserve), in order: decisions.GateArgs; `terms` is the
-- plan's terms for the feature (decisions.GateTerms, GATE_TERMS below) as one tab-joined text.
-- A call sends them up to its last one not at its default (decisions.Decider._gate_call): one
-- missing reads as nil, its default (each argument costs Redis ~900 instructions to receive).
local GATE_ARGV = {'event_id', 'org', 'user', 'key_id', 'cost', 'terms', 'metadata', 'reservation_ttl_s', 'unit_cost',
  'min_cost', 'fingerprint', 'shadow', 'explain'}
local GATE_TERMS = {'feature', 'meter', 'allocation', 'period', 'rollover', 'rl_user_interval_us', 'rl_user_burst',
  'rl_key_interval_us', 'rl_key_burst', 'rl_org_interval_us', 'rl_org_burst', 'auto_register', 'idem_ttl_s',
  'alert_thresholds', 'rl_user_overflow', 'rl_key_overflow', 'rl_org_overflow', 'alloc_overflow', 'credit_order'}
-- The last three only when the call reads them (a key's or the org's rate window in the plan, an
-- idempotency key), else left off the end (nil).
local GATE_KEYS = {'bal', 'quotas', 'stream', 'reservations', 'expiries', 'rl_key', 'rl_org', 'idem'}
-- Settling a reservation (commit, release): decisions.SettleArgs.
local SETTLE_ARGV = {'reservation_id', 'event_id', 'org', 'key_id', 'units', 'answer_ttl_s', 'metadata',
  'fingerprint', 'beyond_hold', 'alert_thresholds'}
local SETTLE_KEYS = {'bal', 'quotas', 'reservations', 'expiries', 'stream', 'settled'}
-- The balance read: one group per meter, decisions.BalanceArgs.
local BALANCE_ARGV = {'meter', 'allocation', 'period', 'rollover'}

-- Field names of the per-org hashes. Owner: src/quota_gw/layout.py (METER_FIELDS, QUOTA_FIELDS);
-- Lua cannot import it, so tests/test_lua_interface.py pins that these spellings agree.
-- Balance hash: '<meter>:<field>'; quota hash: '<u|t>:<subject>:<meter>:<field>'.
local METER_FIELDS = {allocated = 'a', purchased = 'p', held = 'h', used = 'u', period_end = 'pe',
  limit = 'lim', purchased_total = 'pt', purchased_at_start = 'ps', lots = 'lots', alert_period = 'alpe',
  alert_threshold = 'alt'}
local QUOTA_FIELDS = {limit = 'lim', used = 'used', held = 'h', period_end = 'pe'}
-- The balance hash's one field that is the org's, not a meter's: when the earliest live hold
-- expires (unix s; 0 none; absent: not known, as before it was kept). A decision sweeps expired
-- holds only once that time has come, so the usual one reads no reservation at all.
local HOLDS_DUE = 'holds_due'
-- The balance hash's other org field: whether the org's quota hash may hold a sub-quota. '0': it
-- is empty (no user or team has one: the usual consume reads none), '1': it may (read the
-- caller's); absent: not known (from before the field, or a sub-quota write removed it), look.
-- The usual consume records it; every write of a sub-quota limit removes it: in the same atomic
-- step (store.set_sub_quota, the configuration repair of `rebuild --org`), or after its writes
-- (a full rebuild, gateways stopped), so '0' is never stale.
local SUB_QUOTAS = 'sub_quotas'
-- The org's users, in the balance hash (layout.py): '@<user>' = the user's registration and its
-- rate window ('' none yet, else the GCRA TAT, µs), read with the meter and written with it;
-- '@<user>:<suffix>': what else is known of the user (its team; absent: none), read when needed.
local USER_PREFIX = '@'
local USER_FIELDS = {team = 't'}
local TEAM_SUFFIX = ':' .. USER_FIELDS.team

local function field_names(prefix, fields)
  local t = {}
  for name, suffix in pairs(fields) do t[name] = prefix .. ':' .. suffix end
  return t
end

-- A meter's field names, made once per meter: loaded as Redis Functions, the library's state
-- lives across calls, and building 11 strings a call was a fifth of a decision's Lua time.
local METER_FIELD_NAMES = {}
local function meter_fields(meter)
  return METER_FIELD_NAMES[meter] or memo_put(METER_FIELD_NAMES, 1000, meter, field_names(meter, METER_FIELDS))
end

-- A plan's terms, parsed once and kept by their text (a library's state lives across calls):
-- typed here, not per call. Read through the request (gate_request sets them as its __index).
local TERM_NUMBERS = {'allocation', 'rl_user_interval_us', 'rl_user_burst', 'rl_key_interval_us', 'rl_key_burst',
  'rl_org_interval_us', 'rl_org_burst', 'idem_ttl_s', 'rl_user_overflow', 'rl_key_overflow', 'rl_org_overflow',
  'alloc_overflow'}
local PLAN_TERMS = {}
local function plan_terms(text)
  local found = PLAN_TERMS[text]
  if found then return found end
  local values = {}
  for v in gmatch(text .. '\t', '([^\t]*)\t') do values[#values + 1] = v end
  local t = bind(values, GATE_TERMS)
  for _, name in ipairs(TERM_NUMBERS) do t[name] = tonumber(t[name]) or 0 end
  t.rollover = t.rollover == '1'
  t.auto_register = t.auto_register == '1'
  return memo_put(PLAN_TERMS, 1000, text, {__index = t})
end

-- The answer of every operation: decisions.Decision, field for field (REPLY order), on the wire as
-- one text, the fields joined by tabs (decisions.Decision.from_reply): Redis turns one string
-- into a reply for a fraction of what a 14-element array costs it. `detail` (free text) is last,
-- so a tab in it cannot shift a field. reply{} fills what a call leaves out.
local REPLY = {'status', 'code', 'cost', 'remaining', 'event_id', 'retry_after_ms', 'rl_limit', 'rl_remaining',
  'rl_reset', 'replay', 'would', 'extra', 'sources', 'detail'}
local REPLY_DEFAULTS = {status = 200, code = '', detail = '', cost = 0, remaining = -1, event_id = '',
  retry_after_ms = 0, rl_limit = -1, rl_remaining = -1, rl_reset = 0, replay = 0, would = '', extra = '',
  sources = ''}
-- An answer stored as an array by earlier versions (an idempotency record, a settled reservation,
-- a refund guard: kept for a day or the refund window), read back by replayed().
local LEGACY_REPLY = {'status', 'code', 'detail', 'cost', 'remaining', 'event_id', 'retry_after_ms', 'rl_limit',
  'rl_remaining', 'rl_reset', 'replay', 'would', 'extra', 'sources'}

-- reply(r, more): the answer's text, each field from r, else from `more` (a decision's rate-limit
-- fields), else its default; compiled by init() from REPLY and REPLY_DEFAULTS into one expression.
local reply

local function compile_reply()
  local parts = {}
  for i, name in ipairs(REPLY) do
    local default = REPLY_DEFAULTS[name]
    -- (`or` is safe: no field is ever false.)
    if type(default) == 'number' then
      parts[i] = format('fmt(r.%s or more.%s or %d)', name, name, default)
    else
      parts[i] = format('(r.%s or more.%s or %q)', name, name, default)
    end
  end
  return _G.loadstring('local fmt, none = ...; return function(r, more) more = more or none return '
    .. concat(parts, " .. '\\t' .. ") .. ' end')(fmt, {})
end

-- pack_reply(status, code, cost, ...): the same text from every field given, in REPLY order, no
-- table (the straight paths'); compiled by init() from REPLY. `remaining` comes as text (the
-- caller formats the balance once for its event and its answer: pack_event).
local pack_reply
local PACKED_TEXTS = {remaining = true}

-- fmt(x) as an expression for the compiled packers: inline, a call fewer (~200 instructions) a field.
local function fmt_inline(x)
  return '(small[' .. x .. '] or fmt_large(' .. x .. '))'
end

local function compile_pack_reply()
  local parts = {}
  for i, name in ipairs(REPLY) do
    parts[i] = type(REPLY_DEFAULTS[name]) == 'number' and not PACKED_TEXTS[name] and fmt_inline(name) or name
  end
  return _G.loadstring('local small, fmt_large = ...; return function(' .. concat(REPLY, ', ') .. ') return '
    .. concat(parts, " .. '\\t' .. ") .. ' end')(SMALL_NUMBERS, fmt_large)
end

-- A stored answer given again: marked as a replay (its `replay` field set to 1).
local REPLAY_SPLIT  -- by init(): nine fields, then `replay` (REPLY's 10th), then the rest
local function replayed(rep)
  if type(rep) == 'table' then  -- stored by an earlier version
    local r = {}
    for i, name in ipairs(LEGACY_REPLY) do r[name] = rep[i] end
    rep = reply(r)
  end
  local head, tail = match(rep, REPLAY_SPLIT)
  return head .. '1' .. tail
end

-- Howard Hinnant's civil calendar algorithms (UTC), integer only.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- End (unix seconds) of the period containing now_s: 'month', 'week' (Monday 00:00 UTC),
-- 'day', or '<n>s' (fixed windows aligned to the epoch).
local function period_end(spec, now_s)
  local days = floor(now_s / 86400)
  if spec == 'month' then
    local y, m = civil_from_days(days)
    if m == 12 then y = y + 1; m = 1 else m = m + 1 end
    return days_from_civil(y, m, 1) * 86400
  elseif spec == 'day' then
    return (days + 1) * 86400
  elseif spec == 'week' then
    -- 1970-01-01 was a Thursday: days since the last Monday = (days + 3) % 7.
    return (days - (days + 3) % 7 + 7) * 86400
  end
  local n = tonumber(match(spec, '^(%d+)s$'))
  return (floor(now_s / n) + 1) * n
end

-- Derived event ids (period resets, expired holds) share the request's id but for the last
-- two hex digits, so they are unique, stable and need no extra round trip. The version nibble
-- (13th hex digit) becomes 0, which no request id (a UUID, version 1-8) has: without it, a
-- request id ending in 81 was its own reset's id, and the ledger kept only one of the two.
local function derived_id(base, i)
  return sub(base, 1, 12) .. '0' .. sub(base, 14, 30) .. format('%02x', 128 + i)
end

-- The event sink: one XADD per balance change (or refusal) to the shard's stream: one field,
-- ENTRY_FIELD, the values in EVENT_FIELDS order joined by tabs (src/quota_gw/events.py, the owner:
-- tests/test_lua_interface.py pins the list, tests/test_event_schema.py what each script writes).
local ENTRY_FIELD = 'e'
local EVENT_FIELDS = {'id', 'kind', 'org', 'user', 'key', 'meter', 'feature', 'delta', 'dp', 'cost', 'bal', 'ts',
  'src', 'meta'}
local EVENT_NUMBERS = {delta = true, dp = true, cost = true}  -- written by fmt(); `bal` and `ts` come as text

-- pack_event(id, kind, org, user, key, meter, feature, delta, dp, cost, bal, ts, src, meta): the
-- entry's text, every argument given ('' none); compiled by init() from EVENT_FIELDS. fmt()
-- writes a negated zero, -(0), as 0. `bal` and `ts` come as text: the balance is formatted once
-- for the event and the answer's `remaining` (the same number when nothing is held), the time
-- joined from TIME's own texts by the straight paths (time_text), a fifth of formatting it.
local pack_event

local function compile_pack_event()
  local parts = {}
  for i, name in ipairs(EVENT_FIELDS) do parts[i] = EVENT_NUMBERS[name] and fmt_inline(name) or name end
  return _G.loadstring('local small, fmt_large = ...; return function(' .. concat(EVENT_FIELDS, ', ') .. ') return '
    .. concat(parts, " .. '\\t' .. ") .. ' end')(SMALL_NUMBERS, fmt_large)
end

local Events = {}
Events.__index = Events

local function new_events(stream, base_id, now, org, key_id)
  return setmetatable({stream = stream, base = base_id, n = 0, now = now, org = org, key = key_id}, Events)
end

-- e: {id?, kind, user, meter, feature, delta, dp, cost, bal, meta, src}; src: where a charge's
-- tokens came from (or a refund's went back to), 'layer:amount,...' (see Meter:waterfall).
function Events:add(e)
  local id = e.id
  if not id then
    self.n = self.n + 1
    id = derived_id(self.base, self.n)
  end
  local ts = self.ts
  if not ts then
    ts = fmt(self.now)
    self.ts = ts
  end
  call('XADD', self.stream, '*', ENTRY_FIELD, pack_event(id, e.kind, self.org, e.user or '', self.key,
    e.meter or '', e.feature or '', e.delta or 0, e.dp or 0, e.cost or 0, fmt(e.bal or 0), ts, e.src or '',
    e.meta or ''))
  return id
end

-- Balance of one meter of one org, all in one hash per org (fields '<meter>:<f>', METER_FIELDS)
-- so that every meter an operation may touch is inside one declared key.
--   a allocated left, p purchased left, h held by reservations, u used this period,
--   pe period end (unix s), lim the allocation the period was granted (-1 unlimited),
--   pt purchased credit ever granted (a meter the plan leaves out is forbidden until credit is bought),
--   ps purchased credit at the start of the period (with lim, the base of the low-balance alerts).
--
-- Expired holds are gone for every reader, read-only ones included: a loaded `h` (a meter's
-- or a sub-quota's) is what live reservations hold; `xh` is the part of the stored field that
-- belongs to holds past their expiry and not swept yet, which save() writes back untouched.

-- Sums the holds of this org's reservations past their expiry (now_s >= expires_at) that are
-- still stored, per '<meter>' and per '<subject>:<meter>', for load_meter and load_quota.
-- Reads only: check and balance must not write; the sweep returns them for good.
local NONE = {}  -- no expired holds (read only)

local function expired_holds(rv_key, rx_key, now_s)
  local expired = {}
  local due = call('ZRANGEBYSCORE', rx_key, '-inf', now_s)
  for _, rid in ipairs(due) do
    local raw = call('HGET', rv_key, rid)
    if raw then
      local rec = json_decode(raw)
      expired[rec.m] = (expired[rec.m] or 0) + rec.held
      for _, subject in ipairs({rec.ut or '', rec.tt or ''}) do
        if subject ~= '' then
          local f = subject .. ':' .. rec.m
          expired[f] = (expired[f] or 0) + rec.held
        end
      end
    end
  end
  return expired
end

local Meter = {}
Meter.__index = Meter

-- Credit lots: purchased credit that expires (`x`, unix s) or must be traced (a purchase, which a
-- refund takes back as far as it is unspent), '<meter>:lots' = JSON [{i = id, n = left, x = 0|expiry}].
-- Purchased credit outside any lot (`p` less the lots) is the free pool. Spending draws lots that
-- expire, earliest first, then the free pool, then lots that never expire, oldest first.
-- Decoded once per text (a library's state lives across calls): the text a decision writes is
-- what the next one reads, so lots_text() keeps the lots it encoded, by their text, and the
-- call that reads that text takes them (out of the memo: it may change them). At most 32 kept.
-- A list in the memo may carry what usual_consume asks of it (lots_facts(), below), kept true by
-- whoever changes it; known_lots() forgets them (the list may have changed, or come from a text).
local LOTS, LOTS_MOST = {}, 32
local function known_lots(raw, lots)
  if lots.due then lots.due = nil end  -- (`due` first: lots_facts() sets the rest with it)
  memo_put(LOTS, LOTS_MOST, raw, lots)
end
-- The lots of a text, kept in the memo (decoded on a miss): for a reader that may not change them.
local function lots_of(raw)
  local lots = LOTS[raw]
  if lots then return lots end
  lots = json_decode(raw)
  if type(lots) ~= 'table' then lots = {} end
  known_lots(raw, lots)
  return lots
end

-- The lots of a text, the caller's own (out of the memo: it may change them).
local function decode_lots(raw)
  if not raw or raw == '' then return {} end
  local lots = lots_of(raw)
  LOTS[raw] = nil
  return lots
end

-- One HMGET reads every field of the meter (the alerts' too), when holds fall due and whether
-- the org has sub-quotas (SUB_QUOTAS: the straight paths' straight_user reads it).
local function read_meter(bal_key, meter)
  local f = METER_FIELD_NAMES[meter] or meter_fields(meter)
  return call('HMGET', bal_key, f.allocated, f.purchased, f.held, f.used, f.period_end, f.limit,
    f.purchased_total, f.purchased_at_start, f.lots, f.alert_period, f.alert_threshold, HOLDS_DUE, SUB_QUOTAS)
end

-- `v`: read_meter's reply when the caller has it already (usual_consume's, handed to the gate).
local function load_meter(bal_key, meter, expired, v)
  local f = meter_fields(meter)
  v = v or read_meter(bal_key, meter)
  local xh = expired[meter] or 0
  return setmetatable({key = bal_key, m = meter, f = f, xh = xh,
    a = tonumber(v[1]) or 0, p = tonumber(v[2]) or 0, h = (tonumber(v[3]) or 0) - xh,
    u = tonumber(v[4]) or 0, pe = tonumber(v[5]), lim = tonumber(v[6]), pt = tonumber(v[7]) or 0,
    ps = tonumber(v[8]) or 0, lots = decode_lots(v[9]), alpe = tonumber(v[10]), alt = tonumber(v[11]),
    holds_due = tonumber(v[12]), pending = {}, period_moved = nil, lots_dirty = nil}, Meter)
end

-- Brings the meter to the current period and plan, in memory only: `pending` holds the
-- reset/adjust events that save() writes, so read-only callers see the same numbers.
function Meter:refresh(alloc, spec, rollover, now_s)
  if self.pe == nil or now_s >= self.pe then
    local old_a = self.a
    local new_a = 0
    if alloc > 0 then
      new_a = alloc
      if rollover and self.pe ~= nil then new_a = old_a + alloc end
    end
    self.a = new_a
    self.u = 0
    self.pe = period_end(spec, now_s)
    self.lim = alloc
    self.ps = self.p
    self.period_moved = true
    insert(self.pending, {kind = 'reset', delta = new_a - old_a,
      meta = json_encode({period_end = self.pe, allocation = alloc, purchased = self.p})})
  elseif self.lim ~= alloc then
    -- The plan (or its allocation) changed mid-period: move the allocation by the difference.
    local old_a = self.a
    local old_lim = self.lim or 0
    if old_lim < 0 then old_lim = 0 end
    local new_a = 0
    if alloc > 0 then new_a = max(0, old_a + alloc - old_lim) end
    self.a = new_a
    self.lim = alloc
    self.period_moved = true
    insert(self.pending, {kind = 'adjust', delta = new_a - old_a,
      meta = json_encode({period_end = self.pe, allocation = alloc, reason = 'plan_change'})})
  end
end

function Meter:unlimited()
  return self.lim ~= nil and self.lim < 0
end

-- What can still be spent at org level (-1: unlimited).
function Meter:available()
  if self:unlimited() then return -1 end
  return self.a + self.p - self.h
end

function Meter:balance()
  return self.a + self.p
end

-- Lots past their expiry stop counting: each is taken out of `p` by an `expire` event (pending,
-- like a reset, so read-only callers see the same numbers and only save() writes).
function Meter:expire_lots(now_s)
  local lots = self.lots
  local due = false
  for j = 1, #lots do
    local x = lots[j].x
    if x > 0 and x <= now_s then due = true; break end
  end
  if not due then return end  -- the usual case: nothing to rebuild
  local kept = {}
  for _, lot in ipairs(lots) do
    if lot.x > 0 and lot.x <= now_s then
      local n = min(lot.n, self.p)
      if n > 0 then
        self.p = self.p - n
        insert(self.pending, {kind = 'expire', delta = -n, dp = -n,
          meta = json_encode({lot = lot.i, expired = n, expires_at = lot.x})})
      end
      self.lots_dirty = true
    else
      kept[#kept + 1] = lot
    end
  end
  self.lots = kept
end

-- Takes `amount` of purchased credit out of the lots, in spending order (see decode_lots); what
-- the free pool covers touches no lot. Call with `p` as it was before the draw.
function Meter:draw_lots(amount, p_before)
  if amount <= 0 or #self.lots == 0 then return end
  local in_lots = 0
  for _, lot in ipairs(self.lots) do in_lots = in_lots + lot.n end
  local free = max(0, p_before - in_lots)
  local order = {}
  for i, lot in ipairs(self.lots) do if lot.x > 0 then order[#order + 1] = i end end
  sort(order, function(x, y) return self.lots[x].x < self.lots[y].x end)
  local left = amount
  local function take(i)
    local d = min(self.lots[i].n, left)
    self.lots[i].n = self.lots[i].n - d
    left = left - d
  end
  for _, i in ipairs(order) do if left > 0 then take(i) end end
  left = left - min(free, left)
  for i, lot in ipairs(self.lots) do if left > 0 and lot.x == 0 then take(i) end end
  self:drop_spent_lots()
end

-- Forgets spent lots that never expire. A spent lot that expires stays until its expiry: a
-- refund of a charge it paid finds it there and puts its share back (gone: expired, not restored).
local function unspent(lots)
  for j = 1, #lots do
    local lot = lots[j]
    if lot.n <= 0 and lot.x <= 0 then  -- one to forget: the list without it (and any other)
      local kept = {}
      for i = 1, #lots do
        lot = lots[i]
        if lot.n > 0 or lot.x > 0 then kept[#kept + 1] = lot end
      end
      return kept
    end
  end
  return lots
end

function Meter:drop_spent_lots()
  self.lots = unspent(self.lots)
  self.lots_dirty = true
end

-- The lots' text as src/sync_worker/lots.py encode() writes it, [{"i":id,"n":left,"x":expiry},...],
-- the integers in full (cjson writes 14 significant digits, through snprintf). A lot's id and
-- expiry never change: their text is made once per lot and kept on it (the memo above keeps the
-- lot across calls), so a write formats only what is left of each.
-- (`open` and `close`: the same with the brackets of a list of one, the usual list.)
local function lot_text(lot)
  local head = lot.head
  if not head then
    head = '{"i":' .. json_encode(lot.i) .. ',"n":'
    local tail = ',"x":' .. fmt(lot.x) .. '}'
    lot.head, lot.tail, lot.open, lot.close = head, tail, '[' .. head, tail .. ']'
  end
  return head .. fmt(lot.n) .. lot.tail
end
local function encode_lots(lots)
  local lot = lots[1]
  if #lots == 1 and lot.head then  -- the usual one: a lot seen before, written out (a call saved)
    local n = lot.n
    return lot.open .. (SMALL_NUMBERS[n] or fmt_large(n)) .. lot.close
  end
  local parts = {}
  for j = 1, #lots do parts[j] = lot_text(lots[j]) end
  return '[' .. concat(parts, ',') .. ']'
end

-- The text of changed lots when some are left, for the caller's HSET (one with the meter's
-- fields), kept in the memo; else nil (none left: their field is deleted here).
local function changed_lots_text(bal_key, field, lots)
  if #lots == 0 then
    call('HDEL', bal_key, field)
    return nil
  end
  local raw = encode_lots(lots)
  known_lots(raw, lots)  -- written last: nothing changes them after this
  return raw
end

-- The lots' text when they changed (changed_lots_text), else nil.
function Meter:lots_text()
  if not self.lots_dirty then return nil end
  self.lots_dirty = false
  return changed_lots_text(self.key, self.f.lots, self.lots)
end

function Meter:save_lots()
  local raw = self:lots_text()
  if raw then call('HSET', self.key, self.f.lots, raw) end
end

-- The lot that expires next: expiry (unix s) and amount, or 0, 0.
function Meter:next_expiry()
  local x, n = 0, 0
  for _, lot in ipairs(self.lots) do
    if lot.x > 0 and lot.n > 0 and (x == 0 or lot.x < x) then x, n = lot.x, lot.n
    elseif lot.x > 0 and lot.x == x then n = n + lot.n end
  end
  return x, n
end

-- --- The waterfall: the layers a charge is drawn from, in order. -------------------------
-- 'allocated' (the period's allocation), then the credit layers in the plan's order
-- (credit_order 'gp': grants first, 'pg': purchased first): 'grant:<lot>' per lot that expires,
-- earliest expiry first, and 'purchased' (the free pool, then lots that never expire, oldest
-- first). A layer is {layer, had, take, lot = index of a grant's lot}.

-- The credit layers, in order, with what each has (nothing taken yet).
function Meter:credit_layers(order)
  if #self.lots == 0 then return {{layer = 'purchased', had = max(0, self.p), take = 0}} end
  local lots = self.lots
  local in_lots, never = 0, 0
  local grants = {}
  for i = 1, #lots do
    local lot = lots[i]
    in_lots = in_lots + lot.n
    if lot.x > 0 then grants[#grants + 1] = i else never = never + lot.n end
  end
  if #grants > 1 then sort(grants, function(x, y) return lots[x].x < lots[y].x end) end
  local out = {}
  local purchased = {layer = 'purchased', had = max(0, self.p - in_lots) + never, take = 0}
  if order == 'pg' then out[1] = purchased end
  for j = 1, #grants do
    local i = grants[j]
    out[#out + 1] = {layer = 'grant:' .. lots[i].i, had = lots[i].n, take = 0, lot = i}
  end
  if order ~= 'pg' then out[#out + 1] = purchased end
  return out
end

-- Plans a charge of `price` down the layers without changing anything: the allocation first
-- (unless credit_only: a call past a rate window), then the credit layers at `mult` times what
-- the allocation did not cover (alloc_overflow 0: no credit past the allocation). Holds (`h`)
-- stay covered: the total may not exceed what is available. Returns the layers, the total and,
-- when it does not fit, the refusal {layer, had} (nothing is then taken).
function Meter:waterfall(price, credit_only, mult, alloc_overflow, order)
  local layers, total = {}, 0
  if self:unlimited() then return layers, price, nil end
  local left = price
  if not credit_only then
    local take = min(self.a, left)
    layers[#layers + 1] = {layer = 'allocated', had = self.a, take = take}
    total, left = take, left - take
    -- alloc_overflow 0: no credit past the allocation (a meter the plan leaves out runs on credit).
    if left > 0 and alloc_overflow == 0 and (self.lim or 0) > 0 then
      return layers, total, {layer = 'allocated', had = self.a}
    end
  end
  if left > 0 then
    local need = left * max(1, mult)
    local credit = self:credit_layers(order)
    for j = 1, #credit do
      local l = credit[j]
      l.take = min(l.had, need)
      need, total = need - l.take, total + l.take
      layers[#layers + 1] = l
    end
    if need > 0 then
      local last = layers[#layers]
      return layers, total, {layer = last.layer, had = last.had}
    end
  end
  if total > self:available() then return layers, total, {layer = 'held', had = self:available()} end
  return layers, total, nil
end

-- 'allocated:2,grant:p1:2,purchased:1': the layers that gave something, in order.
local function sources(layers)
  local out = ''
  for i = 1, #layers do
    local l = layers[i]
    if l.take > 0 then
      if out == '' then out = l.layer .. ':' .. fmt(l.take) else out = out .. ',' .. l.layer .. ':' .. fmt(l.take) end
    end
  end
  return out
end

-- Takes what the planned layers give. Returns the allocated part, the purchased part (every
-- credit layer) and the sources.
function Meter:take(layers, total)
  self.u = self.u + total
  local from_a, from_p = 0, 0
  for j = 1, #layers do
    local l = layers[j]
    if l.take > 0 then
      if l.layer == 'allocated' then
        self.a = self.a - l.take; from_a = from_a + l.take
      else
        if l.lot then
          self.lots[l.lot].n = self.lots[l.lot].n - l.take
          self.lots_dirty = true
        elseif #self.lots > 0 then  -- purchased: the free pool, then lots that never expire, oldest first
          local in_lots = 0
          for _, lot in ipairs(self.lots) do in_lots = in_lots + lot.n end
          local left = l.take - min(max(0, self.p - in_lots), l.take)
          for _, lot in ipairs(self.lots) do
            if left > 0 and lot.x == 0 then
              local d = min(lot.n, left)
              lot.n, left = lot.n - d, left - d
              self.lots_dirty = true
            end
          end
        end
        self.p = self.p - l.take; from_p = from_p + l.take
      end
    end
  end
  if self.lots_dirty then self:drop_spent_lots() end
  return from_a, from_p, sources(layers)
end

-- Charges `cost` as far as the layers go (a commit: its cost is already what it may take),
-- allocation first unless credit_only. Returns the allocated part, the purchased part, the sources.
function Meter:charge(cost, credit_only, order)
  if self:unlimited() then
    self.u = self.u + cost
    return 0, 0, ''
  end
  local layers = self:waterfall(cost, credit_only, 1, 1, order)
  local total = 0
  for _, l in ipairs(layers) do total = total + l.take end
  return self:take(layers, total)
end

-- Writes the pending events (resets, adjustments, expired lots), then forgets them.
function Meter:save_pending(events, user, feature)
  if #self.pending == 0 then return end
  for _, e in ipairs(self.pending) do
    e.user = user; e.meter = self.m; e.feature = feature or ''; e.dp = e.dp or 0; e.cost = 0
    e.bal = self:balance()
    events:add(e)
  end
  self.pending = {}
end

-- Writes a, p and u only (commit, refund: the period and the holds are as loaded).
-- Writes a, p and u only (commit, refund: the period and the holds are as loaded), with the
-- lots when they changed: one HSET.
function Meter:save_spend()
  local f, lots = self.f, self:lots_text()
  if lots then
    call('HSET', self.key, f.allocated, self.a, f.purchased, self.p, f.used, self.u, f.lots, lots)
  else
    call('HSET', self.key, f.allocated, self.a, f.purchased, self.p, f.used, self.u)
  end
end

-- The period's fields (end, limit, purchased at its start) only when refresh() moved them, the
-- lots only when they changed: one HSET.
function Meter:save(events, user, feature)
  self:save_pending(events, user, feature)
  local f, key, lots = self.f, self.key, self:lots_text()
  local held = self.h + self.xh
  if self.period_moved and lots then
    call('HSET', key, f.allocated, self.a, f.purchased, self.p, f.held, held, f.used, self.u,
      f.period_end, self.pe, f.limit, self.lim, f.purchased_at_start, self.ps, f.lots, lots)
  elseif self.period_moved then
    call('HSET', key, f.allocated, self.a, f.purchased, self.p, f.held, held, f.used, self.u,
      f.period_end, self.pe, f.limit, self.lim, f.purchased_at_start, self.ps)
  elseif lots then
    call('HSET', key, f.allocated, self.a, f.purchased, self.p, f.held, held, f.used, self.u,
      f.lots, lots)
  else
    call('HSET', key, f.allocated, self.a, f.purchased, self.p, f.held, held, f.used, self.u)
  end
end

-- Low-balance alerts. `spec`: thresholds, percent of the period's base (its allocation plus the
-- purchased credit it started with), e.g. '25,10,0'. The decision that takes what is available
-- to or below a threshold records one `alert` event (delta 0), in this same script; the alert
-- period and lowest threshold alerted in it (METER_FIELDS alert_period, alert_threshold) make
-- it once per threshold per meter per period. Called after save() so the events follow the charge.
-- The charges judge it (consume, commit); a hold changes no balance, so reserve does not (commit.lua).
local THRESHOLDS = {}  -- spec -> {numbers..., top = the highest}, parsed once per spec
local function thresholds(spec)
  local found = THRESHOLDS[spec]
  if found then return found end
  found = {top = -1}
  for t in gmatch(spec, '%d+') do
    t = tonumber(t)
    found[#found + 1] = t
    if t > found.top then found.top = t end
  end
  return memo_put(THRESHOLDS, 100, spec, found)
end

function Meter:alerts(events, user, feature, spec)
  if spec == nil or spec == '' or self:unlimited() then return end
  local base = max(self.lim or 0, 0) + self.ps
  if base <= 0 then return end
  local avail = self:available()
  local ts = thresholds(spec)
  if avail * 100 > ts.top * base then return end  -- above every threshold: none can be crossed
  local f = self.f
  local lowest = 101
  if self.alpe == self.pe then lowest = self.alt or 101 end
  local now_lowest = lowest
  for i = 1, #ts do
    local t = ts[i]
    if t < lowest and avail * 100 <= t * base then
      events:add({kind = 'alert', user = user, meter = self.m, feature = feature, delta = 0, bal = self:balance(),
        meta = json_encode({threshold = t, balance = avail, allocated = self.a, purchased = self.p,
          period_end = self.pe, base = base})})
      if t < now_lowest then now_lowest = t end
    end
  end
  if now_lowest ~= lowest then
    call('HSET', self.key, f.alert_period, self.pe, f.alert_threshold, now_lowest)
  end
end

-- Sub-quota of a user ('u:<id>') or team ('t:<name>') for one meter, in the org's quota hash.
-- Usage resets when the org meter's period moves on.
local Quota = {}
Quota.__index = Quota

local function load_quota(q_key, subject, meter, pe, expired)
  if subject == nil or subject == '' then return nil end
  local sm = subject .. ':' .. meter
  -- Most callers have no sub-quota: read its limit alone first.
  local lim = tonumber(call('HGET', q_key, sm .. ':' .. QUOTA_FIELDS.limit))
  if lim == nil then return nil end
  local f = field_names(sm, QUOTA_FIELDS)
  local v = call('HMGET', q_key, f.used, f.held, f.period_end)
  local used = tonumber(v[1]) or 0
  if tonumber(v[3]) ~= pe then used = 0 end
  local xh = expired[sm] or 0
  return setmetatable({key = q_key, f = f, lim = lim, used = used, h = (tonumber(v[2]) or 0) - xh, xh = xh,
    pe = pe, subject = subject}, Quota)
end

function Quota:available()
  return self.lim - self.used - self.h
end

function Quota:save()
  local f = self.f
  call('HSET', self.key, f.used, self.used, f.held, self.h + self.xh, f.period_end, self.pe)
end

-- The sub-quotas of a reservation or refund record (rec.ut, rec.tt), those still set.
local function load_quotas(q_key, rec, meter, pe, expired)
  local qs = {}
  for _, subject in ipairs({rec.ut or '', rec.tt or ''}) do
    local q = load_quota(q_key, subject, meter, pe, expired)
    if q then qs[#qs + 1] = q end
  end
  return qs
end

-- GCRA on the server clock. interval_us = window / limit; burst = calls allowed at once.
-- Returns allowed, new_tat, retry_after_us, remaining, reset_us.
local function gcra(stored_tat, interval_us, burst, now)
  local tat = stored_tat or now
  if tat < now then tat = now end
  local new_tat = tat + interval_us
  local allow_at = new_tat - burst * interval_us
  if now < allow_at then
    return false, tat, allow_at - now, 0, tat - now
  end
  local remaining = floor((now - allow_at) / interval_us)
  return true, new_tat, 0, remaining, new_tat - now
end

-- Checks every configured rate limit without writing. limits = {{where, interval_us, burst,
-- stored tat}, ...}. Returns ok, the reply's rate-limit fields (of the tightest limit), and the
-- writes to make ({where, new tat, reset}).
local function rate_limits(limits, now)
  local ok, retry, writes = true, 0, {}
  local best_limit, best_rem, best_reset = -1, -1, 0
  for _, r in ipairs(limits) do
    local allowed, tat, wait, rem, reset = gcra(r[4], r[2], r[3], now)
    if not allowed then
      ok = false
      if wait > retry then retry = wait end
    else
      writes[#writes + 1] = {r[1], tat, reset}
    end
    if best_rem < 0 or rem < best_rem then
      best_limit, best_rem, best_reset = r[3], rem, reset
    end
  end
  return ok, {rl_limit = best_limit, rl_remaining = best_rem, rl_reset = ceil(best_reset / 1000000),
    retry_after_ms = ceil(retry / 1000)}, writes
end

-- What a decision writes of its user (its field, USER_PREFIX), as the field-value pair that ends
-- the HSET writing its meter (nothing: the returns end that call's arguments): its new window
-- (`new_tat`, a time in µs: big_arg), or '' to register a user not `known` yet; no user
-- (`user_field` nil), or a known one without a new window: nothing.
local function user_writes(user_field, known, new_tat)
  if not user_field then return end
  if new_tat then return user_field, big_arg(new_tat) end
  if not known then return user_field, '' end
end

-- The gate's write of its user (save_rate_limits, refuse), on its own: nothing to write, no call.
local function save_user(bal_key, user, known, new_tat)
  if user == '' or known and not new_tat then return end
  call('HSET', bal_key, user_writes(USER_PREFIX .. user, known, new_tat))
end

-- The user's window lives in the balance hash, written with its registration in one HSET (the
-- user's field is only written for a user not yet registered); key and org windows are keys
-- that expire when the window is full again.
local function save_rate_limits(req)
  local writes, user_tat = req.rl_writes, nil
  for i = 1, #writes do
    local w = writes[i]
    if w[1] == 'user' then
      user_tat = w[2]
    else
      call('SET', req.keys[w[1]], w[2], 'PX', max(1, ceil(w[3] / 1000)))
    end
  end
  if req.user ~= '' and (user_tat or req.register) then save_user(req.keys.bal, req.user, not req.register, user_tat) end
  req.register = false
end

-- Reservations of an org: hash rid -> JSON record, and a zset of their expiries.
local function release_hold(bal_key, q_key, rec)
  local m = rec.m
  call('HINCRBY', bal_key, meter_fields(m).held, -rec.held)
  for _, subject in ipairs({rec.ut, rec.tt}) do
    if subject and subject ~= '' then
      call('HINCRBY', q_key, subject .. ':' .. m .. ':' .. QUOTA_FIELDS.held, -rec.held)
    end
  end
end

-- Returns one expired hold to its meter (a `release` event, reason expired) and forgets it.
-- org = {bal, quotas, reservations, expiries} (keys).
local function expire_hold(org, events, rid, rec)
  release_hold(org.bal, org.quotas, rec)
  local f = meter_fields(rec.m)
  local v = call('HMGET', org.bal, f.allocated, f.purchased)
  events:add({kind = 'release', user = rec.u, meter = rec.m, feature = rec.f,
    bal = (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0),
    meta = json_encode({reservation_id = rid, held = rec.held, reason = 'expired'})})
  call('HDEL', org.reservations, rid)
  call('ZREM', org.expiries, rid)
end

-- Returns expired holds (at most `max` a call, oldest first) to their meters. Returns true when
-- none is left past its expiry (fewer than `max` were due).
local function sweep_expired(org, events, now_s, most)
  local due = call('ZRANGEBYSCORE', org.expiries, '-inf', now_s, 'LIMIT', 0, most)
  for _, rid in ipairs(due) do
    local raw = call('HGET', org.reservations, rid)
    if raw then
      expire_hold(org, events, rid, json_decode(raw))
    else
      call('ZREM', org.expiries, rid)
    end
  end
  if #due >= most then return false end
  local next_due = call('ZRANGE', org.expiries, 0, 0, 'WITHSCORES')
  call('HSET', org.bal, HOLDS_DUE, next_due[2] or 0)
  return true
end

-- Whether a hold may be past its expiry, by HOLDS_DUE (`due`, a number; nil: not known, look).
local function holds_may_be_due(due, now_s)
  return due == nil or (due > 0 and now_s >= due)
end

-- The sub-quotas a call touches (user, team), without holes (ipairs stops at a nil).
local NO_QUOTAS = {}  -- read only
local function quotas(req)
  if not req.uq and not req.tq then return NO_QUOTAS end
  local qs = {}
  if req.uq then qs[#qs + 1] = req.uq end
  if req.tq then qs[#qs + 1] = req.tq end
  return qs
end

-- What the caller may still spend: the tightest of the levels (-1 unlimited).
local function remaining(req)
  local r = req.mtr:available()
  for _, q in ipairs(quotas(req)) do
    local a = max(0, q:available())
    if r < 0 or a < r then r = a end
  end
  return r
end

-- Returns the stored answer of an idempotent retry, or nil. No fingerprint (nil, ''): no key given.
local function replay(idem_key, fp)
  if not fp or fp == '' then return nil end
  local stored = call('GET', idem_key)
  if not stored then return nil end
  local r = json_decode(stored)
  if r.fp ~= fp then
    return reply{status = 422, code = 'invalid_request', detail = 'idempotency key reused with a different request',
      replay = 1}
  end
  return replayed(r.reply)
end

local function remember(idem_key, fp, ttl, rep)
  if not fp or fp == '' then return end
  call('SET', idem_key, json_encode({fp = fp, reply = rep}), 'EX', ttl)
end

-- --- The gate every decision (check, consume, reserve) goes through, step by step. ----------

-- Step 1, arguments: the bound ARGV (GATE_ARGV names) becomes the request, typed in place
-- (one table a decision, not two), with the keys and the server time; the plan's terms are
-- read through it (its __index).
local function gate_request(k, a, now)
  setmetatable(a, plan_terms(a.terms))
  a.keys = k
  a.metadata = a.metadata or ''
  a.cost = tonumber(a.cost)
  a.shadow = a.shadow == '1'
  a.reservation_ttl_s = tonumber(a.reservation_ttl_s)
  a.unit_cost = tonumber(a.unit_cost)
  a.min_cost = tonumber(a.min_cost) or 0
  a.explain = a.explain == '1'
  a.price = a.cost  -- what the call is priced at; `cost` becomes what the waterfall charges
  if a.explain then a.layers = {} end  -- the waterfall as evaluated (rate windows, sub-quotas, the meter's layers)
  a.now = now
  a.now_s = floor(now / 1000000)
  a.team = ''
  return a
end

-- Step 2, user: a known user may belong to a team; an unknown one is registered (or refused)
-- when the call is decided (save_rate_limits, refuse). Its rate window is read with it.
local function gate_user(req, write)
  if req.user == '' then return nil end
  local uf = USER_PREFIX .. req.user
  local v = call('HMGET', req.keys.bal, uf, uf .. TEAM_SUFFIX)  -- registration and window, team
  if v[1] then
    req.team = v[2] or ''
    req.user_tat = tonumber(v[1])  -- ('': none yet)
  elseif req.auto_register then
    req.register = write
  else
    return {403, 'forbidden', 'unknown user ' .. req.user, 'user', 0}
  end
  return nil
end

-- Step 3, rate limits (user, key, org; interval 0 = none): checked now, written on success.
-- Per limit: where its state lives (the user's in the balance hash, USER_FIELDS; the key's and
-- the org's a key of GATE_KEYS), its two terms and its overflow (GATE_TERMS), its layer.
-- A call past a window whose plan says `overflow: credit` (overflow = the price multiple, 0 =
-- none) is not refused here: it is priced at the highest multiple of the windows it is past,
-- drawn from credit only (gate_levels), and advances no window: they did not pay for it.
local RATE_LIMITS = {{'user', 'rl_user_interval_us', 'rl_user_burst', 'rl_user_overflow', 'rate:user'},
  {'rl_key', 'rl_key_interval_us', 'rl_key_burst', 'rl_key_overflow', 'rate:key'},
  {'rl_org', 'rl_org_interval_us', 'rl_org_burst', 'rl_org_overflow', 'rate:org'}}

local NO_RATE_LIMIT = {rl_limit = -1, rl_remaining = -1, rl_reset = 0, retry_after_ms = 0}  -- read only
local NO_WRITES = {}  -- read only

local function gate_rate_limits(req)
  local limits = nil  -- {where, interval_us, burst, stored tat, RATE_LIMITS entry}
  for i = 1, #RATE_LIMITS do
    local lim = RATE_LIMITS[i]
    local interval = req[lim[2]]
    if interval > 0 and not (i == 1 and req.user == '') then
      local tat
      if i == 1 then tat = req.user_tat else tat = tonumber(call('GET', req.keys[lim[1]])) end
      limits = limits or {}
      limits[#limits + 1] = {lim[1], interval, req[lim[3]], tat, lim}
    end
  end
  if not limits then
    req.rl, req.rl_writes = NO_RATE_LIMIT, NO_WRITES
    return nil
  end
  local ok, rl, writes = rate_limits(limits, req.now)
  req.rl, req.rl_writes = rl, writes
  if ok then
    if req.explain then
      for _, r in ipairs(limits) do insert(req.layers, {layer = r[5][5], had = 1, take = 1}) end
    end
    return nil
  end
  local mult, refused = 0, nil
  for _, r in ipairs(limits) do
    local allowed = gcra(r[4], r[2], r[3], req.now)
    local ov = tonumber(req[r[5][4]]) or 0
    if req.layers then
      insert(req.layers, {layer = r[5][5], had = allowed and 1 or 0, take = allowed and 1 or 0,
        overflow = (not allowed and ov > 0) and ov or nil})
    end
    if not allowed then
      if ov == 0 then
        refused = refused or r[5][5]
      elseif ov > mult then
        mult = ov
      end
    end
  end
  if refused then
    return {429, 'rate_limited', 'rate limit exceeded; retry in ' .. rl.retry_after_ms .. ' ms', refused, 0}
  end
  req.overflow, req.rl_writes = mult, NO_WRITES
  return nil
end

-- Step 4, period: the meter brought to the current period and plan; a meter the plan leaves
-- out is forbidden until credit is bought.
local function gate_period(req)
  local meter = req.mtr
  meter:refresh(req.allocation, req.period, req.rollover, req.now_s)
  meter:expire_lots(req.now_s)
  if meter.lim == 0 and meter.p <= 0 and meter.pt <= 0 then
    return {403, 'plan_forbids', req.meter .. ' is not available on your plan', 'plan', 0}
  end
  return nil
end

-- A team or user sub-quota (or nil) against what the call takes: nil, or the refusal.
local function level_fits(req, q, who, name)
  if not q then return nil end
  local had = max(0, q:available())
  if req.explain then insert(req.layers, {layer = 'quota:' .. who, had = had, take = min(had, req.cost)}) end
  if req.cost > q:available() then
    return {402, 'insufficient_balance', who .. ' ' .. name .. ' quota of ' .. req.meter .. ' has ' .. had
      .. ' left, the call costs ' .. req.cost, 'quota:' .. who, had}
  end
  return nil
end

-- Step 5, levels: the meter's layers (the waterfall: allocation, then credit) must give the
-- call's cost, and team and user must each afford what it takes. req.cost becomes what is
-- charged (past a rate window or the allocation, credit at the plan's multiple).
local function gate_levels(req, expired)
  local meter = req.mtr
  if req.user ~= '' then req.uq = load_quota(req.keys.quotas, 'u:' .. req.user, req.meter, meter.pe, expired) end
  if req.team ~= '' then req.tq = load_quota(req.keys.quotas, 't:' .. req.team, req.meter, meter.pe, expired) end
  local uq, tq = req.uq, req.tq
  -- A flexible hold (LLM max_tokens): take what every level can afford, if at least the minimum.
  if req.min_cost > 0 and not req.overflow then
    local cap = remaining(req)
    if cap >= 0 and req.cost > cap and cap >= req.min_cost then req.cost = cap end
  end
  local credit_only = req.overflow ~= nil
  local steps, total, short = meter:waterfall(req.cost, credit_only, req.overflow or req.alloc_overflow,
    req.alloc_overflow, req.credit_order)
  if req.explain then
    for _, l in ipairs(steps) do insert(req.layers, l) end
  end
  req.steps = steps
  if not short then req.cost = total end
  if short and credit_only then  -- past the window, and credit cannot pay for it: 429 as without overflow
    return {429, 'rate_limited', 'rate limit exceeded and the credit of ' .. req.meter .. ' cannot pay for the call ('
      .. short.layer .. ' had ' .. short.had .. '); retry in ' .. req.rl.retry_after_ms .. ' ms', short.layer, short.had}
  elseif short then
    return {402, 'insufficient_balance', 'balance of ' .. req.meter .. ' is ' .. max(0, meter:available())
      .. ', the call costs ' .. req.cost, short.layer, short.had}
  end
  return level_fits(req, tq, 'team', req.team) or level_fits(req, uq, 'user', req.user)
end

-- Runs the steps; the first refusal (status, code, detail) wins, but every step runs, so a
-- refusal still reports rate limits and what is left. `write`: consume and reserve (a check
-- writes nothing). `now`, `meter_read`: the server time and read_meter's reply when the caller
-- has them (a consume usual_consume gave back), not fetched again.
-- Returns the request (with its meter and levels) and the refusal or nil.
local function gate(k, a, write, now, meter_read)
  local req = gate_request(k, a, now or now_us())
  req.events = new_events(k.stream, req.event_id, req.now, req.org, req.key_id)
  local v = meter_read or read_meter(k.bal, req.meter)
  local expired = NONE  -- what the sweep left
  if holds_may_be_due(tonumber(v[12]), req.now_s) then
    if not (write and sweep_expired(k, req.events, req.now_s, 16)) then
      expired = expired_holds(k.reservations, k.expiries, req.now_s)
    end
    v = read_meter(k.bal, req.meter)  -- as the sweep left it
  end
  req.mtr = load_meter(k.bal, req.meter, expired, v)
  local refusal = gate_user(req, write)
  local rl_refusal = gate_rate_limits(req)
  local plan_refusal = gate_period(req)
  local level_refusal = gate_levels(req, expired)
  return req, refusal or rl_refusal or plan_refusal or level_refusal
end

-- --- The straight paths' user and alert test (usual_consume, usual_reserve). ----------------
-- Held to the gate's rules by tests/test_usual_consume.py and tests/test_usual_settle.py.

-- The user of a straight call: known (or registered by it), no sub-quota, inside its rate window
-- (the gate's gate_user, level_fits and gate_rate_limits for the usual case). `user_field`: the
-- user's field (USER_PREFIX; nil: no user), `x` its value read with the meter (false: not
-- registered; '': no window yet; else the window). `has_sub_quotas`: the meter's SUB_QUOTAS
-- field, no sub-quota to read in an org that has none ('0'); not known (false): the quota hash
-- says, recorded now (a fact about the hash, whatever the call decides); the user's team is read
-- only then. Returns ok, the new window (nil: none), its remaining and its reset (µs).
local function straight_user(t, quotas_key, bal_key, has_sub_quotas, user_field, user, meter, now, x)
  if not user_field then return true, nil, -1, 0 end
  if not x and not t.auto_register then return false end
  if not has_sub_quotas then
    has_sub_quotas = call('HLEN', quotas_key) == 0 and '0' or '1'
    call('HSET', bal_key, SUB_QUOTAS, has_sub_quotas)
  end
  if has_sub_quotas ~= '0' then
    if call('HGET', quotas_key, 'u:' .. user .. ':' .. meter .. ':' .. QUOTA_FIELDS.limit) then return false end
    local team = x and call('HGET', bal_key, user_field .. TEAM_SUFFIX)
    if team and team ~= '' and call('HGET', quotas_key, 't:' .. team .. ':' .. meter .. ':' .. QUOTA_FIELDS.limit) then
      return false
    end
  end
  local rl_interval = t.rl_user_interval_us
  if rl_interval > 0 then
    -- (tonumber: '' and anything but digits, only hand-written, read as no window, as the gate reads them)
    local allowed, new_tat, _, rl_rem, rl_reset = gcra(tonumber(x), rl_interval, t.rl_user_burst, now)
    if not allowed then return false end
    return true, new_tat, rl_rem, rl_reset
  end
  return true, nil, -1, 0
end

-- Would a charge leaving `avail` cross a threshold not yet alerted in this period (Meter:alerts'
-- rule: the gate records the alert)? In two parts: alert_base, from the meter's `ps` (its text),
-- the thresholds and their base when `avail` is at or below one (nil: none can be crossed), then
-- crosses_threshold, from the period and threshold last alerted (their texts), so that a reader
-- of the meter reads those two only when a threshold is in reach.
local function alert_base(spec, lim, x_ps, avail)
  if spec == '' or lim < 0 then return nil end
  local base = (lim > 0 and lim or 0) + (NUMBERS[x_ps] or number_of(x_ps) or 0)
  if base <= 0 then return nil end
  local ts = THRESHOLDS[spec] or thresholds(spec)
  if avail * 100 > ts.top * base then return nil end  -- above every threshold: none can be crossed
  return ts, base
end
local function crosses_threshold(ts, base, avail, pe, x_alpe, x_alt)
  local lowest = 101
  if (NUMBERS[x_alpe] or number_of(x_alpe)) == pe then lowest = NUMBERS[x_alt] or number_of(x_alt) or 101 end
  for i = 1, #ts do
    if ts[i] < lowest and avail * 100 <= ts[i] * base then return true end
  end
  return false
end
-- Both, for a straight path that read the meter's `ps` (`x_ps`) but not the alert fields: those
-- two read only when a threshold is in reach.
local function crosses_alert(bal_key, f, spec, lim, x_ps, pe, avail)
  local ts, base = alert_base(spec, lim, x_ps, avail)
  if not ts then return false end
  local r = call('HMGET', bal_key, f.alert_period, f.alert_threshold)
  return crosses_threshold(ts, base, avail, pe, r[1], r[2])
end

-- The usual consume's read of its meter: read_meter's fields but `pt` (purchased credit ever:
-- the gate's alone) and the period and threshold last alerted (read when a threshold is in
-- reach): ~2,000 instructions a field (Redis finds each in the hash, sends it, Lua makes it a
-- string). In this order: a, p, h, u, pe, lim, ps, lots, holds_due, SUB_QUOTAS, then the user's
-- field (`...`: none without a user).
local function read_usual_meter(bal_key, f, ...)
  return call('HMGET', bal_key, f.allocated, f.purchased, f.held, f.used, f.period_end, f.limit,
    f.purchased_at_start, f.lots, HOLDS_DUE, SUB_QUOTAS, ...)
end
-- For the gate: read_usual_meter's reply `v` as read_meter's, the three fields it left read now
-- (nothing was written between, but the SUB_QUOTAS mark, which the gate does not read from it).
local function as_meter_read(bal_key, f, v)
  local r = call('HMGET', bal_key, f.purchased_total, f.alert_period, f.alert_threshold)
  return {v[1], v[2], v[3], v[4], v[5], v[6], r[1], v[7], v[8], r[2], r[3], v[9], v[10]}
end

-- What a usual consume asks of a list of credit lots, found once and kept on it (the memo keeps the
-- list across calls, and with it these, while they hold: see known_lots): `due`, the earliest
-- expiry (0: none expires); `usual`, whether the lots are plan_lots_charge's shape (at most one
-- that expires, `grant` (false: none); none below nothing, no spent one that never expires);
-- `in_lots`, what they hold; `never`, what the ones that never expire hold. Returns `due`.
local function lots_facts(lots)
  local due, in_lots, never, grant, usual = 0, 0, 0, false, true
  for j = 1, #lots do
    local lot = lots[j]
    local n, x = lot.n, lot.x
    if n < 0 or n == 0 and x <= 0 then usual = false end  -- hand-written data: the meter's rules for it
    in_lots = in_lots + n
    if x > 0 then
      if grant then usual = false end  -- two that expire: in the order of their expiry (the waterfall's)
      grant = lot
      if due == 0 or x < due then due = x end
    else
      never = never + n
    end
  end
  lots.due, lots.usual, lots.grant, lots.in_lots, lots.never = due, usual, grant, in_lots, never
  return due
end

-- The waterfall of a usual consume's charge with credit lots (Meter:waterfall, allocation first,
-- written out for the shape lots are mostly in: at most one that expires), without the layers'
-- tables. Plans only: the allocated part, the lot that expires and its part, the purchased part
-- (the free pool, then lots that never expire) and what the lots held in all; nil when the
-- charge does not fit or the lots are another shape (the meter's own waterfall then decides).
-- (The lots' shape and sums: lots_facts(), found before.)
local function plan_lots_charge(lots, a, p, held, lim, price, overflow, order)
  if not lots.usual then return nil end
  local in_lots, never, grant = lots.in_lots, lots.never, lots.grant
  local from_a = a < price and a or price
  local left = price - from_a
  local from_g, from_p = 0, 0
  if left > 0 then
    if overflow == 0 and lim > 0 then return nil end
    local need = overflow > 1 and left * overflow or left
    local pool = p - in_lots
    pool = (pool > 0 and pool or 0) + never
    local granted = grant and grant.n or 0
    if order == 'pg' then
      from_p = pool < need and pool or need
      from_g = granted < need - from_p and granted or need - from_p
    else
      from_g = granted < need and granted or need
      from_p = pool < need - from_g and pool or need - from_g
    end
    if from_g + from_p < need then return nil end
  end
  if from_a + from_g + from_p > a + p - held then return nil end
  return from_a, grant, from_g, from_p, in_lots
end

-- The start of a straight consume or reserve: the plan's terms (nil: a key's or the org's rate
-- window, which the gate keeps), the server time (s, µs: now_us() with the seconds kept), the
-- meter's field names and TIME's reply (for time_text). (The caches read here, their function
-- only on a miss.)
local function usual_start(terms)
  local t = (PLAN_TERMS[terms] or plan_terms(terms)).__index
  if t.rl_key_interval_us > 0 or t.rl_org_interval_us > 0 then return nil end
  local x = call('TIME')
  local now_s = NUMBERS[x[1]] or number_of(x[1])
  return t, now_s, now_s * 1000000 + x[2], METER_FIELD_NAMES[t.meter] or meter_fields(t.meter), x
end

-- --- The usual consume, straight through. ----------------------------------------------
-- Most decisions are the same shape: no idempotency key, a user without a sub-quota, at most a
-- user rate window (not past it), a meter in its period with no credit lot past its expiry and
-- no hold due, a charge that fits and crosses no alert threshold. usual_consume decides exactly
-- those with the gate's rules in straight-line code, none of the steps' tables (292k instructions
-- a call through the steps, 207k straight: docs/benchmarks.md) but for credit lots, drawn by the
-- meter's own waterfall (Meter:waterfall, Meter:take) as the gate draws them, and returns nil, having written
-- nothing (but the SUB_QUOTAS mark, a fact about the quota hash), for anything else (with the
-- server time and the meter it read, once it has them): the gate then decides it from those.
-- tests/test_usual_consume.py holds the two to the same answers, events and balances.
local function usual_consume(keys, argv)
  -- KEYS and ARGV as named locals, not bound tables (binding them cost ~10 % of the call): the
  -- names of GATE_KEYS and GATE_ARGV in their order (tests/test_lua_interface.py reads these two
  -- lines). Those a call left off the end are nil (their default).
  local bal_key, quotas_key, stream_key = unpack(keys)
  local event_id, org, user, key_id, cost, terms, metadata, _, _, _, fingerprint, shadow = unpack(argv)
  if fingerprint and fingerprint ~= '' or shadow == '1' then return nil end
  local t, now_s, now, f, time = usual_start(terms)
  if not t then return nil end
  local meter = t.meter
  local uf, v  -- the user's field (registration and window), read with the meter and written with it
  if user == '' then v = read_usual_meter(bal_key, f) else uf = USER_PREFIX .. user; v = read_usual_meter(bal_key, f, uf) end
  local x
  -- Numbers from the meter's texts (NUMBERS: those that repeat; `+ 0`: those each charge moves).
  x = v[5]
  local pe = NUMBERS[x] or number_of(x)
  x = v[6]
  local lim = NUMBERS[x] or number_of(x)
  if pe == nil or now_s >= pe or lim ~= t.allocation then  -- refresh
    return nil, now, as_meter_read(bal_key, f, v)
  end
  local raw_lots, lots = v[8], nil
  if raw_lots == '' then raw_lots = nil end
  if raw_lots then  -- credit lots: none may be past its expiry (the gate records their `expire`)
    lots = LOTS[raw_lots] or lots_of(raw_lots)
    x = lots.due or lots_facts(lots)  -- the earliest expiry
    if x > 0 and x <= now_s then return nil, now, as_meter_read(bal_key, f, v) end
  end
  x = v[9]
  if holds_may_be_due(NUMBERS[x] or number_of(x), now_s) then  -- the sweep
    return nil, now, as_meter_read(bal_key, f, v)
  end
  x = v[2]
  local pu = NUMBERS[x] or x and x + 0 or 0
  if lim == 0 and pu <= 0 then  -- nothing to charge from, maybe forbidden: the gate says
    return nil, now, as_meter_read(bal_key, f, v)
  end
  if pu < 0 then return nil, now, as_meter_read(bal_key, f, v) end  -- (only hand-written data: the gate's rules for it)
  x = v[1]
  local al = NUMBERS[x] or x and x + 0 or 0
  if al < 0 then return nil, now, as_meter_read(bal_key, f, v) end  -- (only hand-written data: the gate's rules for it)
  x = v[3]
  local held = NUMBERS[x] or x and x + 0 or 0
  x = v[4]
  local used = NUMBERS[x] or x and x + 0 or 0
  -- The user: known (or registered by this call), no sub-quota, inside its rate window.
  local ok, new_tat, rl_rem, rl_reset = straight_user(t, quotas_key, bal_key, v[10], uf, user, meter, now, v[11])
  if not ok then return nil, now, as_meter_read(bal_key, f, v) end
  -- The charge: the allocation, then purchased credit at the plan's multiple (no lots: one pool;
  -- lots: the meter's own waterfall, as the gate draws them).
  cost = NUMBERS[cost] or number_of(cost)
  local take_a, take_p, total = 0, 0, cost
  local unlimited = lim < 0
  local src, lots_meter, lots_dirty = '', nil, false
  local from_a, grant, from_g, from_p, in_lots
  if raw_lots and not unlimited then
    from_a, grant, from_g, from_p, in_lots = plan_lots_charge(lots, al, pu, held, lim, cost, t.alloc_overflow,
      t.credit_order)
  end
  if from_a then  -- the lots' shape planned above: taken as Meter:take takes (its `sources` too)
    LOTS[raw_lots] = nil  -- the lots are this call's now
    if from_g > 0 then
      grant.n = grant.n - from_g
      lots.in_lots = in_lots - from_g  -- (the lots' other facts hold: the lot that expires stays)
      lots_dirty = true
    end
    local free = pu - in_lots
    local left = free > 0 and from_p - free or from_p  -- past the free pool: lots that never expire, oldest first
    if left > 0 then
      for j = 1, #lots do
        local lot = lots[j]
        if left > 0 and lot.x == 0 then
          local d = lot.n < left and lot.n or left
          lot.n, left = lot.n - d, left - d
          lots_dirty = true
        end
      end
      lots.due = nil  -- their facts found again (lots_facts) by the next reader
      lots = unspent(lots)  -- (only a lot that never expires is forgotten spent)
    end
    if not lots_dirty then memo_put(LOTS, LOTS_MOST, raw_lots, lots) end  -- unchanged: the next reader's, facts and all
    take_a, take_p, total = from_a, from_g + from_p, from_a + from_g + from_p
    al, pu = al - take_a, pu - take_p
    -- The layers that gave, in the waterfall's order: allocated, then grant and purchased (or
    -- purchased and grant: credit_order 'pg'). The grant's 'grant:<lot>:' is made once per lot,
    -- kept on it (the memo keeps the lot across calls).
    if from_g > 0 then
      local head = grant.src
      if not head then head = 'grant:' .. grant.i .. ':'; grant.src = head end
      src = head .. (SMALL_NUMBERS[from_g] or fmt_large(from_g))
      if from_p > 0 then
        local purchased = 'purchased:' .. (SMALL_NUMBERS[from_p] or fmt_large(from_p))
        if t.credit_order == 'pg' then src = purchased .. ',' .. src else src = src .. ',' .. purchased end
      end
    elseif from_p > 0 then
      src = 'purchased:' .. (SMALL_NUMBERS[from_p] or fmt_large(from_p))
    end
    if take_a > 0 then
      local allocated = 'allocated:' .. (SMALL_NUMBERS[take_a] or fmt_large(take_a))
      src = src == '' and allocated or allocated .. ',' .. src
    end
  elseif raw_lots and not unlimited then
    local m = setmetatable({key = bal_key, m = meter, f = f, a = al, p = pu, h = held, u = used, lim = lim,
      lots = lots, lots_dirty = nil}, Meter)
    local steps, planned, short = m:waterfall(cost, false, t.alloc_overflow, t.alloc_overflow, t.credit_order)
    if short then return nil, now, as_meter_read(bal_key, f, v) end
    LOTS[raw_lots] = nil  -- the lots are this call's now: take() may change them
    take_a, take_p, src = m:take(steps, planned)
    if not m.lots_dirty then known_lots(raw_lots, m.lots) end  -- unchanged: the next reader's again
    total = planned
    al, pu = m.a, m.p
    lots_meter = m
  elseif not unlimited then  -- (min and max written out: a call each saved)
    take_a = al < cost and al or cost
    local left = cost - take_a
    if left > 0 then
      local overflow = t.alloc_overflow
      if overflow == 0 and lim > 0 then return nil, now, as_meter_read(bal_key, f, v) end
      take_p = overflow > 1 and left * overflow or left
      if take_p > pu then return nil, now, as_meter_read(bal_key, f, v) end  -- (take_p > 0: as take_p > max(0, pu))
    end
    total = take_a + take_p
    if total > al + pu - held then return nil, now, as_meter_read(bal_key, f, v) end
    al, pu = al - take_a, pu - take_p
  end
  used = used + total
  -- Alerts: none may be crossed here (the gate records them).
  if not unlimited and crosses_alert(bal_key, f, t.alert_thresholds, lim, v[7], pe, al + pu - held) then
    return nil, now, as_meter_read(bal_key, f, v)
  end
  -- Decided: write the meter, the user, the event. Numbers go to Redis through big_arg; texts
  -- made here (fmt written out: a call each saved).
  -- The lots when the charge drew one (lots_text(): after every refusal, it may delete their field).
  local lots_text
  -- Lots left are put in the memo with their facts (kept true above), not through known_lots.
  if lots_meter then lots_text = lots_meter:lots_text() elseif lots_dirty then
    if lots[1] then
      lots_text = encode_lots(lots)
      memo_put(LOTS, LOTS_MOST, lots_text, lots)
    else
      lots_text = changed_lots_text(bal_key, f.lots, lots)  -- none left: their field deleted
    end
  end
  -- A layer the charge did not draw (its field holds what it held) is not sent again: the hash
  -- ends the same, for two arguments and a field set less (~2,500 instructions). (Numbers: big_arg.)
  -- The user's writes end each (user_writes).
  local used_arg = SMALL_NUMBERS[used] or big_arg(used)
  if take_a == 0 then  -- the allocation spent before (a charge that draws credit), or nothing to take
    if lots_text then
      call('HSET', bal_key, f.purchased, SMALL_NUMBERS[pu] or big_arg(pu), f.used, used_arg, f.lots, lots_text,
        user_writes(uf, v[11], new_tat))
    else
      call('HSET', bal_key, f.purchased, SMALL_NUMBERS[pu] or big_arg(pu), f.used, used_arg,
        user_writes(uf, v[11], new_tat))
    end
  elseif take_p == 0 and not lots_text then  -- the usual one: the allocation alone
    call('HSET', bal_key, f.allocated, SMALL_NUMBERS[al] or big_arg(al), f.used, used_arg,
      user_writes(uf, v[11], new_tat))
  elseif lots_text then
    call('HSET', bal_key, f.allocated, SMALL_NUMBERS[al] or big_arg(al), f.purchased, SMALL_NUMBERS[pu] or big_arg(pu),
      f.used, used_arg, f.lots, lots_text, user_writes(uf, v[11], new_tat))
  else
    call('HSET', bal_key, f.allocated, SMALL_NUMBERS[al] or big_arg(al), f.purchased, SMALL_NUMBERS[pu] or big_arg(pu),
      f.used, used_arg, user_writes(uf, v[11], new_tat))
  end
  if not raw_lots then
    if take_a > 0 then src = 'allocated:' .. (SMALL_NUMBERS[take_a] or fmt_large(take_a)) end
    if take_p > 0 then
      src = (src == '' and '' or src .. ',') .. 'purchased:' .. (SMALL_NUMBERS[take_p] or fmt_large(take_p))
    end
  end
  -- The event (no sink table: this is the only one) and the answer.
  local bal = al + pu
  local bal_text = SMALL_NUMBERS[bal] or fmt_large(bal)
  call('XADD', stream_key, '*', ENTRY_FIELD, pack_event(event_id, 'consume', org, user, key_id, meter, t.feature,
    -(take_a + take_p), -take_p, total, bal_text, time_text(time), src, metadata or ''))
  return pack_reply(200, '', total, unlimited and '-1' or held == 0 and bal_text or fmt(bal - held), event_id, 0,
    new_tat and t.rl_user_burst or -1, rl_rem, ceil(rl_reset / 1000000), 0, '', '', src, '')
end

-- The waterfall as evaluated (check with explain): each layer, what it had and would give,
-- and the first that refused. Rate windows count calls (1: the window pays for this one).
local function explained(req, refusal)
  local layers = {}
  for _, l in ipairs(req.layers) do
    insert(layers, {layer = l.layer, had = l.had, gives = l.take, overflow = l.overflow})
  end
  local out = {layers = layers}
  if req.overflow then out.overflow_cost = req.overflow end
  if refusal then out.refused_by = {layer = refusal[4], had = refusal[5], reason = refusal[2]} end
  return json_encode(out)
end

-- A gate decision's answer: the request's rate-limit fields, then `r`'s.
local function decision(req, r)
  return reply(r, req.rl)
end

-- A refusal: nothing changes but one `denied` event (delta 0). In shadow mode the call
-- passes, uncharged, and the answer says what would have happened.
local function refuse(req, refusal)
  if req.register then save_user(req.keys.bal, req.user, false) end
  req.events:add({id = req.event_id, kind = 'denied', user = req.user, meter = req.meter, feature = req.feature,
    delta = 0, cost = 0, bal = req.mtr:balance(),
    meta = json_encode({code = refusal[2], status = refusal[1], cost = req.cost, layer = refusal[4],
      had = refusal[5], reason = refusal[3]})})
  if req.shadow then
    return decision(req, {cost = 0, remaining = remaining(req), event_id = req.event_id, would = refusal[2]})
  end
  return decision(req, {status = refusal[1], code = refusal[2], detail = refusal[3], cost = req.cost,
    remaining = remaining(req), event_id = req.event_id})
end

-- --- Settling a reservation (commit, release) happens once; a retry gets the first answer. ---
-- k = SETTLE_KEYS, a = SETTLE_ARGV bound. a.fingerprint: a retry with a different body is 409,
-- not the first answer.
local SETTLED = {commit = 'committed', release = 'released'}  -- an op's past tense, for messages

local function settle_start(op, k, a)
  local rid = a.reservation_id
  local done = call('GET', k.settled)
  if done then
    local d = json_decode(done)
    if d.op ~= op then
      return nil, reply{status = 409, code = 'conflict', detail = 'reservation already ' .. SETTLED[d.op],
        replay = 1}
    end
    if d.fp and (a.fingerprint or '') ~= '' and d.fp ~= a.fingerprint then
      return nil, reply{status = 409, code = 'conflict',
        detail = 'reservation already settled by a different ' .. op .. ' request', replay = 1}
    end
    return nil, replayed(d.reply)
  end
  local now = now_us()
  local now_s = floor(now / 1000000)
  local events = new_events(k.stream, a.event_id, now, a.org, a.key_id)
  -- Other holds past their expiry are swept first, once the earliest hold's expiry has come
  -- (holds_due; absent: not known, look). Settling this hold leaves holds_due as it is: an
  -- earlier mark than the earliest hold only costs a sweep that finds nothing.
  local due = tonumber(call('HGET', k.bal, HOLDS_DUE))
  local swept_all = true
  if holds_may_be_due(due, now_s) then swept_all = sweep_expired(k, events, now_s, 16) end
  local raw = call('HGET', k.reservations, rid)
  local rec = raw and json_decode(raw)
  local expires = tonumber(call('ZSCORE', k.expiries, rid))  -- as the sweep reads it
  if rec and expires and now_s >= expires then
    -- Past its expiry: gone, swept or not, so the answer is the same whatever ran before.
    expire_hold(k, events, rid, rec)
    rec = nil
  end
  if not rec then
    return nil, reply{status = 404, code = 'not_found', detail = 'reservation ' .. rid .. ' not found or expired'}
  end
  release_hold(k.bal, k.quotas, rec)
  call('HDEL', k.reservations, rid)
  call('ZREM', k.expiries, rid)
  -- The reservation, the event sink, the server time (s), and the holds still stored past their expiry.
  return {rec = rec, events = events, now_s = now_s,
    expired = swept_all and NONE or expired_holds(k.reservations, k.expiries, now_s)},
    nil
end

local function settle_finish(op, k, a, rep)
  call('SET', k.settled, json_encode({op = op, fp = a.fingerprint or '', reply = rep}), 'EX',
    tonumber(a.answer_ttl_s))
  return rep
end

-- --- The usual reserve, commit and release, straight through. ----------------------------
-- As usual_consume for consume: the common shape (no idempotency key, no shadow, no sub-quota,
-- at most a user rate window and not past it, a meter in its period with no credit lots and no
-- hold due, a hold or charge that fits, no alert threshold crossed) decided in straight-line
-- code by the same rules; anything else returns nil having written nothing (but the SUB_QUOTAS
-- mark, as usual_consume), and the general path (the gate; settle_start) decides it.
-- tests/test_usual_settle.py holds the two to the same answers, events, balances and replays.
--
-- The JSON these write (the reservation record, the events' meta, the answer's extra, the
-- settled answer) holds what cjson writes for the same table, built by concatenation: a cjson
-- encode of a table was ~9,000 instructions, three a reserve. Its keys are in the order cjson
-- writes them on Redis 7.0; cjson follows the table's hash order, which another server's Lua
-- (Valkey's string hash) changes, so there the two paths' texts may differ in key order only:
-- every reader parses it (settle_start, the sweeps, expired_holds with cjson; the ledger's jsonb). (A commit
-- event's `request`, the caller's metadata, is as given, on both paths: commit_meta.)

-- A JSON string literal is cjson's own (a string alone: ~1,200 instructions, less than a Lua
-- pattern scanning it for what needs escaping). A name of the config (meter, feature, credit
-- order) or a key id is few and repeats: its literal is kept, one table read a call.
local NAME_JSON = {}
local function json_name(s)
  return NAME_JSON[s] or memo_put(NAME_JSON, 1000, s, json_encode(s))
end

-- A JSON integer as cjson writes it: its 14 significant digits (1e+14 and up lose the rest).
local function json_int(n)
  if n < 1e14 and n > -1e14 then return fmt(n) end
  return format('%.14g', n)
end

-- The reservation record (reserve.lua's table) with no rate-window multiple (co) and no
-- sub-quota (ut, tt ''), in cjson's key order, and the patterns that read exactly that text back
-- (strings without escapes, integers). The part after `held` (key, sub-quotas, meter, credit
-- order, feature) is one of few, repeated: read once per text (HOLD_TAILS, like NAME_JSON), so a
-- record's read scans the head only: ~5,000 instructions (the whole record ~8,900, a cjson decode
-- ~15,700). Any other record (an escaped string, a multiple, a sub-quota, an older writer's
-- order) is decoded. (`expires` and `held` as JSON already: the event and the answer write them too.)
local function usual_hold_text(meter, held, unit, user, feature, key_id, expires, order)
  return '{"exp":' .. expires .. ',"u":' .. json_encode(user) .. ',"unit":' .. json_int(unit) .. ',"held":'
    .. held .. ',"k":' .. json_name(key_id) .. ',"tt":"","m":' .. json_name(meter) .. ',"ut":"","o":'
    .. json_name(order) .. ',"f":' .. json_name(feature) .. '}'
end
local USUAL_HOLD_HEAD = '^{"exp":(%d+),"u":"([^"\\]*)","unit":(%d+),"held":(%d+)(.*)$'
local USUAL_HOLD_TAIL = '^,"k":"[^"\\]*","tt":"","m":"([^"\\]*)","ut":"","o":"[^"\\]*","f":"([^"\\]*)"}$'
local HOLD_TAILS = {}  -- a record's tail -> {meter, feature}, or false: not the usual shape

local function hold_tail(tail)
  local m, f = match(tail, USUAL_HOLD_TAIL)
  return memo_put(HOLD_TAILS, 1000, tail, m and {m, f} or false)
end

-- A hold's expiry, user, unit cost, amount, meter and feature if it is of the usual shape (no
-- multiple, no sub-quota), else nil. (The credit order is moot: the usual meter has no lots.)
local function read_usual_hold(raw)
  local exp, u, unit, held, tail = match(raw, USUAL_HOLD_HEAD)
  if exp then
    local mf = HOLD_TAILS[tail]
    if mf == nil then mf = hold_tail(tail) end
    if mf then return exp + 0, u, NUMBERS[unit] or unit + 0, NUMBERS[held] or held + 0, mf[1], mf[2] end
  end
  local rec = json_decode(raw)
  if rec.co or not rec.unit or not rec.exp or (rec.ut or '') ~= '' or (rec.tt or '') ~= '' then return nil end
  return rec.exp, rec.u or '', rec.unit, rec.held, rec.m, rec.f or ''
end

-- A reserve reads the eight meter fields it needs, not read_meter's thirteen (~8,800 instructions
-- less). When the gate decides it instead, the gate reads the thirteen again: so an org whose
-- last reserve went to the gate (credit lots, a sub-quota, a refusal: mostly so call after call)
-- has its next reserve of that meter read the thirteen, handed to the gate if it goes there too.
-- Balance key -> the meter, bounded by the keys marked. (Either read decides the same: this
-- chooses only which.)
local GATED = {}

-- usual_reserve's answer when the gate decides: nil, the server time and read_meter's reply
-- if it was read (`full`); else the org is marked for its next reserve.
local function to_gate(bal_key, meter, now, full)
  if not full then
    if GATED[bal_key] == nil then memo_put(GATED, 1000, bal_key, meter) else GATED[bal_key] = meter end
  end
  return nil, now, full
end

-- reserve.lua's usual case. Returns the answer, or nil with the server time once it has it and
-- read_meter's reply if it read it (for the gate).
local function usual_reserve(keys, argv)
  -- GATE_KEYS and GATE_ARGV in order (tests/test_lua_interface.py reads these two lines).
  local bal_key, quotas_key, stream_key, reservations_key, expiries_key = unpack(keys)
  local event_id, org, user, key_id, cost, terms, _, reservation_ttl_s, unit_cost, min_cost, fingerprint, shadow,
    explain = unpack(argv)
  if fingerprint and fingerprint ~= '' or shadow == '1' or explain == '1' then return nil end
  local t, now_s, now, f, time = usual_start(terms)
  if not t then return nil end
  local meter = t.meter
  local x
  -- The eight fields a reserve reads (read_meter's thirteen less the used, the purchased total
  -- and the alerts'), or read_meter's reply in their order (GATED).
  -- The user's field after them (its registration and window), read on its own after read_meter's.
  local uf = user ~= '' and USER_PREFIX .. user or nil
  local full, v = nil, nil
  if GATED[bal_key] == meter then
    full = read_meter(bal_key, meter)
    v = {full[1], full[2], full[3], full[12], full[5], full[6], full[9], full[13]}
    if uf then v[9] = call('HGET', bal_key, uf) end
  elseif uf then
    v = call('HMGET', bal_key, f.allocated, f.purchased, f.held, HOLDS_DUE, f.period_end, f.limit, f.lots,
      SUB_QUOTAS, uf)
  else
    v = call('HMGET', bal_key, f.allocated, f.purchased, f.held, HOLDS_DUE, f.period_end, f.limit, f.lots,
      SUB_QUOTAS)
  end
  -- Numbers from the meter's texts (NUMBERS: those that repeat; `+ 0`: those each hold moves).
  x = v[5]
  local pe = NUMBERS[x] or number_of(x)
  x = v[6]
  local lim = NUMBERS[x] or number_of(x)
  x = v[4]
  local due = NUMBERS[x] or number_of(x)
  -- A period to refresh, lots: the gate.
  if pe == nil or now_s >= pe or lim ~= t.allocation or (v[7] and v[7] ~= '') then
    return to_gate(bal_key, meter, now, full)
  end
  if holds_may_be_due(due, now_s) then return to_gate(bal_key, meter, now, full) end  -- the sweep
  x = v[1]
  local al = NUMBERS[x] or x and x + 0 or 0
  x = v[2]
  local pu = NUMBERS[x] or x and x + 0 or 0
  x = v[3]
  local held = NUMBERS[x] or x and x + 0 or 0
  if lim == 0 and pu <= 0 then return to_gate(bal_key, meter, now, full) end  -- maybe forbidden: the gate says
  if al < 0 or pu < 0 then return to_gate(bal_key, meter, now, full) end  -- (only hand-written data: the gate's rules)
  local ok, new_tat, rl_rem, rl_reset = straight_user(t, quotas_key, bal_key, v[8], uf, user, meter, now, v[9])
  if not ok then return to_gate(bal_key, meter, now, full) end
  -- The hold: what is asked, or (min_cost, an LLM call's floor) what is left if at least the
  -- floor; then the waterfall as gate_levels runs it, without taking: the allocation, then
  -- purchased credit at the plan's multiple (no lots: one pool).
  cost = NUMBERS[cost] or cost + 0
  local unlimited = lim < 0
  local total = cost
  if not unlimited then
    min_cost = NUMBERS[min_cost] or tonumber(min_cost) or 0
    if min_cost > 0 and cost > al + pu - held and al + pu - held >= min_cost then cost = al + pu - held end
    local take_a = min(al, cost)
    local take_p = 0
    local left = cost - take_a
    if left > 0 then
      if t.alloc_overflow == 0 and lim > 0 then return to_gate(bal_key, meter, now, full) end
      take_p = left * max(1, t.alloc_overflow)
      if take_p > max(0, pu) then return to_gate(bal_key, meter, now, full) end
    end
    total = take_a + take_p
    if total > al + pu - held then return to_gate(bal_key, meter, now, full) end
  end
  -- Decided: the hold, its record and expiry, the user, the event.
  if full then GATED[bal_key] = false end  -- (still counted: a key marked again is not counted twice)
  held = held + total
  local expires = now_s + (NUMBERS[reservation_ttl_s] or number_of(reservation_ttl_s))
  local expires_text, total_text = json_int(expires), json_int(total)
  -- The earliest hold's expiry, once known (as reserve.lua).
  local held_arg = SMALL_NUMBERS[held] or big_arg(held)
  if due == 0 or expires < due then
    call('HSET', bal_key, f.held, held_arg, HOLDS_DUE, expires_text, user_writes(uf, v[9], new_tat))
  else
    call('HSET', bal_key, f.held, held_arg, user_writes(uf, v[9], new_tat))
  end
  call('HSET', reservations_key, event_id, usual_hold_text(meter, total_text,
    NUMBERS[unit_cost] or tonumber(unit_cost) or total, user, t.feature, key_id, expires_text, t.credit_order))
  call('ZADD', expiries_key, expires_text, event_id)
  call('XADD', stream_key, '*', ENTRY_FIELD, pack_event(event_id, 'reserve', org, user, key_id, meter, t.feature,
    0, 0, 0, fmt(al + pu), time_text(time), '', '{"held":' .. total_text .. ',"reservation_id":' .. json_encode(event_id)
    .. ',"expires_at":' .. expires_text .. '}'))
  return pack_reply(201, '', total, unlimited and '-1' or fmt(al + pu - held), event_id, 0,
    new_tat and t.rl_user_burst or -1, rl_rem, ceil(rl_reset / 1000000), 0, '', '{"expires_at":' .. expires_text .. '}',
    '', '')
end

-- The commit event's meta (commit.lua's and usual_commit's: one text, whichever path decides):
-- the hold, what was asked, what could not be charged (overage, when any) in cjson's order for
-- those keys, then the caller's metadata as `request`, as given. The metadata is JSON text the
-- Decider made (orjson: the API's validated object, the sidecar's, the spool's), as a consume
-- event carries it; every reader parses it (the ledger's jsonb). A cjson decode and encode of it
-- (~20,000 instructions) changed its spelling (key order, `\/`) and rounded integers past 14 digits.
local function commit_meta(rid_json, held, want, cost, metadata)
  local open = want > cost and '{"overage":' .. json_int(want - cost) .. ',"held":' or '{"held":'
  return open .. json_int(held) .. ',"reservation_id":' .. rid_json .. ',"requested":' .. json_int(want)
    .. (metadata == '' and '}' or ',"request":' .. metadata .. '}')
end

-- The hold a straight commit or release settles: stored in the usual shape, live, and no hold
-- of the org due (else settle_start sweeps). Not settled before: settling deletes the record in
-- the script that stores the answer, and a reservation id is a new event id (a retry finds no
-- record: settle_start answers it again). Its expiry is the record's: reserve writes the same
-- number to the record and to the expiries. Returns the server time (µs, s) and the hold (user,
-- unit cost, amount, meter, feature), then TIME's reply (time_text), or nil. (The caller reads the
-- meter and holds_due.)
local function usual_hold(reservations_key, rid)
  local raw = call('HGET', reservations_key, rid)
  if not raw then return nil end  -- settle_start says 404, or answers a retry again
  local exp, u, unit, held, m, f = read_usual_hold(raw)
  if not exp then return nil end
  local x = call('TIME')  -- now_us(), with the seconds kept
  local now_s = NUMBERS[x[1]] or number_of(x[1])
  if now_s >= exp then return nil end  -- expired: settle_start returns it (an `expired` release)
  return now_s * 1000000 + x[2], now_s, u, unit, held, m, f, x
end

-- The settled answer (settle_finish's record: a retry gets it again), as cjson writes it.
local function usual_settled(settled_key, op, fingerprint, answer_ttl_s, rep)
  call('SET', settled_key, '{"fp":' .. json_encode(fingerprint) .. ',"op":"' .. op .. '","reply":' .. json_encode(rep)
    .. '}', 'EX', answer_ttl_s)
  return rep
end

-- commit.lua's usual case: the charge as commit.lua makes it (up to the hold as far as the
-- balance goes; beyond it, as far as what no other hold has taken, with `beyond_hold`), no
-- threshold crossed, in the meter's period, no credit lots. Returns the answer or nil.
local function usual_commit(settle_keys, settle_argv)
  -- SETTLE_KEYS and SETTLE_ARGV in order (tests/test_lua_interface.py reads these two lines).
  local bal_key, _, reservations_key, expiries_key, stream_key, settled_key = unpack(settle_keys)
  local reservation_id, event_id, org, key_id, units, answer_ttl_s, metadata, fingerprint, beyond_hold,
    alert_thresholds = unpack(settle_argv)
  local now, now_s, user, unit, held, meter, feature, time = usual_hold(reservations_key, reservation_id)
  if not now then return nil end
  -- The nine fields a commit reads (read_meter's thirteen less the purchased total, the sub-quota
  -- mark and the alerts', which crosses_alert reads when a threshold is in reach).
  local f = METER_FIELD_NAMES[meter] or meter_fields(meter)
  local v = call('HMGET', bal_key, f.allocated, f.purchased, f.held, f.used, f.period_end, f.limit, HOLDS_DUE,
    f.purchased_at_start, f.lots)
  -- Numbers from the meter's texts (NUMBERS: those that repeat; `+ 0`: those each charge moves).
  local x = v[7]
  if holds_may_be_due(NUMBERS[x] or number_of(x), now_s) then return nil end
  x = v[5]
  local pe = NUMBERS[x] or number_of(x)
  x = v[6]
  local lim = NUMBERS[x] or number_of(x)
  if pe == nil or now_s >= pe or lim == nil or (v[9] and v[9] ~= '') then return nil end  -- lots may lapse
  x = v[1]
  local al = NUMBERS[x] or x and x + 0 or 0
  x = v[2]
  local pu = NUMBERS[x] or x and x + 0 or 0
  if al < 0 or pu < 0 then return nil end
  x = v[4]
  local used = NUMBERS[x] or x and x + 0 or 0
  x = v[3]
  local h = (NUMBERS[x] or x and x + 0 or 0) - held  -- the other holds (this one is given back)
  local unlimited = lim < 0
  local want = (NUMBERS[units] or units + 0) * unit
  local cost = min(want, held)
  if not unlimited then cost = min(cost, al + pu) end
  if beyond_hold == '1' and want > cost and cost == held then
    local room = want - cost
    if not unlimited then room = min(room, al + pu - h - cost) end
    if room > 0 then cost = cost + room end
  end
  -- Meter:charge: the allocation, then purchased credit (no lots: one pool).
  local take_a, take_p = 0, 0
  if unlimited then
    used = used + cost
  else
    take_a = min(al, cost)
    if cost > take_a then take_p = min(pu, cost - take_a) end
    al, pu, used = al - take_a, pu - take_p, used + take_a + take_p
    if crosses_alert(bal_key, f, alert_thresholds, lim, v[8], pe, al + pu - h) then return nil end  -- Meter:alerts records it
  end
  local src = ''
  if take_a > 0 then src = 'allocated:' .. fmt(take_a) end
  if take_p > 0 then src = (src == '' and '' or src .. ',') .. 'purchased:' .. fmt(take_p) end
  local meta = commit_meta(json_encode(reservation_id), held, want, cost, metadata)
  -- Decided: the meter (the hold given back, the charge), the hold forgotten, the event, the answer.
  -- (Numbers: big_arg.) A layer the charge did not draw is not sent again (the hash ends the
  -- same: as usual_consume).
  local used_arg, h_arg = SMALL_NUMBERS[used] or big_arg(used), SMALL_NUMBERS[h] or big_arg(h)
  if take_p == 0 and take_a == 0 then
    call('HSET', bal_key, f.used, used_arg, f.held, h_arg)
  elseif take_p == 0 then
    call('HSET', bal_key, f.allocated, SMALL_NUMBERS[al] or big_arg(al), f.used, used_arg, f.held, h_arg)
  elseif take_a == 0 then
    call('HSET', bal_key, f.purchased, SMALL_NUMBERS[pu] or big_arg(pu), f.used, used_arg, f.held, h_arg)
  else
    call('HSET', bal_key, f.allocated, SMALL_NUMBERS[al] or big_arg(al), f.purchased,
      SMALL_NUMBERS[pu] or big_arg(pu), f.used, used_arg, f.held, h_arg)
  end
  call('HDEL', reservations_key, reservation_id)
  call('ZREM', expiries_key, reservation_id)
  local bal = al + pu
  local bal_text = SMALL_NUMBERS[bal] or fmt_large(bal)
  call('XADD', stream_key, '*', ENTRY_FIELD, pack_event(event_id, 'commit', org, user, key_id, meter, feature,
    -(take_a + take_p), -take_p, cost, bal_text, time_text(time), src, meta))
  return usual_settled(settled_key, 'commit', fingerprint, answer_ttl_s, pack_reply(200, '', cost,
    unlimited and '-1' or h == 0 and bal_text or fmt(bal - h), event_id, 0, -1, -1, 0, 0, '',
    '{"released":' .. json_int(max(0, held - cost)) .. ',"feature":' .. json_name(feature) .. ',"overage":'
    .. json_int(max(0, want - cost)) .. ',"meter":' .. json_name(meter) .. '}', src, ''))
end

-- release.lua's usual case: the whole hold given back. Returns the answer or nil.
local function usual_release(settle_keys, settle_argv)
  local bal_key, _, reservations_key, expiries_key, stream_key, settled_key = unpack(settle_keys)
  local reservation_id, event_id, org, key_id, _, answer_ttl_s, _, fingerprint = unpack(settle_argv)
  local now, now_s, user, _, held, meter, feature, time = usual_hold(reservations_key, reservation_id)
  if not now then return nil end
  -- The five fields a release reads (read_meter's twelve: ~12,800 instructions more a release).
  local f = METER_FIELD_NAMES[meter] or meter_fields(meter)
  local v = call('HMGET', bal_key, f.allocated, f.purchased, f.held, f.limit, HOLDS_DUE)
  local x = v[5]
  if holds_may_be_due(NUMBERS[x] or number_of(x), now_s) then return nil end
  x = v[1]
  local al = NUMBERS[x] or x and x + 0 or 0
  x = v[2]
  local pu = NUMBERS[x] or x and x + 0 or 0
  x = v[4]
  local lim = NUMBERS[x] or number_of(x)
  x = v[3]
  local h = (NUMBERS[x] or x and x + 0 or 0) - held
  call('HSET', bal_key, f.held, SMALL_NUMBERS[h] or big_arg(h))
  call('HDEL', reservations_key, reservation_id)
  call('ZREM', expiries_key, reservation_id)
  local bal = al + pu
  local bal_text = SMALL_NUMBERS[bal] or fmt_large(bal)
  call('XADD', stream_key, '*', ENTRY_FIELD, pack_event(event_id, 'release', org, user, key_id, meter, feature,
    0, 0, 0, bal_text, time_text(time), '', '{"held":' .. json_int(held) .. ',"reservation_id":'
    .. json_encode(reservation_id) .. ',"reason":"released"}'))
  return usual_settled(settled_key, 'release', fingerprint, answer_ttl_s, pack_reply(200, '', 0,
    (lim ~= nil and lim < 0) and '-1' or h == 0 and bal_text or fmt(bal - h), event_id, 0, -1, -1, 0, 0, '',
    '{"released":' .. json_int(held) .. '}', '', ''))
end

-- The library's first call: the globals (take_globals), the compiled binders and reply.
-- The fields a gate request gains after its arguments (gate_request and the steps).
local REQUEST_FIELDS = {'keys', 'price', 'layers', 'now', 'now_s', 'team', 'events', 'mtr', 'rl', 'rl_writes',
  'user_tat', 'register', 'uq', 'tq', 'steps', 'overflow'}
local ready = false
-- functions_vm: called by the Functions library (scripts.library), not by a script run with EVAL.
local function init(functions_vm)
  if ready then return end
  take_globals()
  if functions_vm then
    -- The garbage collector of the Functions VM (its own Lua state, holding only this library;
    -- EVAL scripts have another, left as it is) at half its default speed (stepmul 200: twice
    -- the allocation rate). A call's garbage (redis.call replies, texts) is most of what it
    -- allocates, and collecting it (sweeps, marks, malloc/free) is memory-bound: ~4,000
    -- instructions a consume saved, more in time. The heap stays bounded (~430 KB over 200,000
    -- consumes on Redis 7.0, ~380 KB at the default; docs/benchmarks.md). The pause does not
    -- matter here: Redis forces a GC step every 50 script calls, which starts the next cycle;
    -- below 100 the collector may fall behind the allocation (Lua's manual), for ~400 more.
    _G.collectgarbage('setstepmul', 100)
  end
  for n = -1, 1023 do SMALL_NUMBERS[n] = format('%d', n) end
  big_arg = (_G.redis.REDIS_VERSION_NUM or 0) >= 0x070200 and as_is or fmt_large
  for n = 0, 999 do DIGITS3[n] = format('%03d', n) end
  small_texts(NUMBERS)
  REPLAY_SPLIT = '^(' .. _G.string.rep('[^\t]*\t', 9) .. ')[^\t]*(.*)$'
  BINDERS[GATE_KEYS] = compile_binder(GATE_KEYS)
  BINDERS[GATE_ARGV] = compile_binder(GATE_ARGV, REQUEST_FIELDS)
  BINDERS[SETTLE_KEYS] = compile_binder(SETTLE_KEYS)
  BINDERS[SETTLE_ARGV] = compile_binder(SETTLE_ARGV)
  reply = compile_reply()
  pack_reply = compile_pack_reply()
  pack_event = compile_pack_event()
  ready = true
end
