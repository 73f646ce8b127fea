-- Shared prelude, prepended to every operation script when it is registered.
-- All money is integer tokens; Lua numbers are doubles, exact up to 2^53.
-- Time comes from the Redis server (TIME), never from the caller.

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function fmt(n)
  return string.format('%d', n)
end

-- Howard Hinnant's civil calendar algorithms (UTC), integer only.
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- End (unix seconds) of the period containing now_s: 'month', 'week' (Monday 00:00 UTC),
-- 'day', or '<n>s' (fixed windows aligned to the epoch).
local function period_end(spec, now_s)
  local days = math.floor(now_s / 86400)
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
  local n = tonumber(string.match(spec, '^(%d+)s$'))
  return (math.floor(now_s / n) + 1) * n
end

-- Derived event ids (period resets, expired holds) share the request's id but for the last
-- two hex digits, so they are unique, stable and need no extra round trip. The version nibble
-- (13th hex digit) becomes 0, which no request id (a UUID, version 1-8) has: without it, a
-- request id ending in 81 was its own reset's id, and the ledger kept only one of the two.
local function derived_id(base, i)
  return string.sub(base, 1, 12) .. '0' .. string.sub(base, 14, 30) .. string.format('%02x', 128 + i)
end

-- The event sink: one XADD per balance change (or refusal) to the shard's stream.
local Events = {}
Events.__index = Events

local function new_events(stream, base_id, now, org, key_id)
  return setmetatable({stream = stream, base = base_id, n = 0, now = now, org = org, key = key_id}, Events)
end

-- e: {id?, kind, user, meter, feature, delta, dp, cost, bal, meta}
function Events:add(e)
  local id = e.id
  if not id then
    self.n = self.n + 1
    id = derived_id(self.base, self.n)
  end
  redis.call('XADD', self.stream, '*',
    'id', id, 'kind', e.kind, 'org', self.org, 'user', e.user or '', 'key', self.key,
    'meter', e.meter or '', 'feature', e.feature or '',
    'delta', fmt(e.delta or 0), 'dp', fmt(e.dp or 0), 'cost', fmt(e.cost or 0),
    'bal', fmt(e.bal or 0), 'ts', fmt(self.now), 'meta', e.meta or '')
  return id
end

-- Balance of one meter of one org, all in one hash per org (fields '<meter>:<f>') so that
-- every meter an operation may touch is inside one declared key.
--   a allocated left, p purchased left, h held by reservations, u used this period,
--   pe period end (unix s), lim the allocation the period was granted (-1 unlimited),
--   pt purchased credit ever granted (a meter the plan leaves out is forbidden until credit is bought),
--   ps purchased credit at the start of the period (with lim, the base of the low-balance alerts).
--
-- Expired holds are gone for every reader, read-only ones included: a loaded `h` (a meter's
-- or a sub-quota's) is what live reservations hold; `xh` is the part of the stored field that
-- belongs to holds past their expiry and not swept yet, which save() writes back untouched.
local EXPIRED = {}

-- Sums the holds of this org's reservations past their expiry (now_s >= expires_at) that are
-- still stored, per '<meter>' and per '<subject>:<meter>', into EXPIRED for load_meter and
-- load_quota. Reads only: check and balance must not write; the sweep returns them for good.
local function note_expired(rv_key, rx_key, now_s)
  EXPIRED = {}
  local due = redis.call('ZRANGEBYSCORE', rx_key, '-inf', now_s)
  for _, rid in ipairs(due) do
    local raw = redis.call('HGET', rv_key, rid)
    if raw then
      local rec = cjson.decode(raw)
      EXPIRED[rec.m] = (EXPIRED[rec.m] or 0) + rec.held
      for _, subject in ipairs({rec.ut or '', rec.tt or ''}) do
        if subject ~= '' then
          local f = subject .. ':' .. rec.m
          EXPIRED[f] = (EXPIRED[f] or 0) + rec.held
        end
      end
    end
  end
end

local Meter = {}
Meter.__index = Meter

-- Credit lots: purchased credit that expires (`x`, unix s) or must be traced (a purchase, which a
-- refund takes back as far as it is unspent), '<meter>:lots' = JSON [{i = id, n = left, x = 0|expiry}].
-- Purchased credit outside any lot (`p` less the lots) is the free pool. Spending draws lots that
-- expire, earliest first, then the free pool, then lots that never expire, oldest first.
local function load_lots(bal_key, meter)
  local raw = redis.call('HGET', bal_key, meter .. ':lots')
  if not raw or raw == '' then return {} end
  local lots = cjson.decode(raw)
  if type(lots) ~= 'table' then return {} end
  return lots
end

local function load_meter(bal_key, meter)
  local v = redis.call('HMGET', bal_key, meter .. ':a', meter .. ':p', meter .. ':h',
    meter .. ':u', meter .. ':pe', meter .. ':lim', meter .. ':pt', meter .. ':ps')
  local xh = EXPIRED[meter] or 0
  return setmetatable({key = bal_key, m = meter, xh = xh,
    a = tonumber(v[1]) or 0, p = tonumber(v[2]) or 0, h = (tonumber(v[3]) or 0) - xh,
    u = tonumber(v[4]) or 0, pe = tonumber(v[5]), lim = tonumber(v[6]), pt = tonumber(v[7]) or 0,
    ps = tonumber(v[8]) or 0, lots = load_lots(bal_key, meter), pending = {}}, Meter)
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
    table.insert(self.pending, {kind = 'reset', delta = new_a - old_a,
      meta = cjson.encode({period_end = self.pe, allocation = alloc, purchased = self.p})})
  elseif self.lim ~= alloc then
    -- The plan (or its allocation) changed mid-period: move the allocation by the difference.
    local old_a = self.a
    local old_lim = self.lim or 0
    if old_lim < 0 then old_lim = 0 end
    local new_a = 0
    if alloc > 0 then new_a = math.max(0, old_a + alloc - old_lim) end
    self.a = new_a
    self.lim = alloc
    table.insert(self.pending, {kind = 'adjust', delta = new_a - old_a,
      meta = cjson.encode({period_end = self.pe, allocation = alloc, reason = 'plan_change'})})
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
  local kept = {}
  for _, lot in ipairs(self.lots) do
    if lot.x > 0 and lot.x <= now_s then
      local n = math.min(lot.n, self.p)
      if n > 0 then
        self.p = self.p - n
        table.insert(self.pending, {kind = 'expire', delta = -n, dp = -n,
          meta = cjson.encode({lot = lot.i, expired = n, expires_at = lot.x})})
      end
      self.lots_dirty = true
    else
      table.insert(kept, lot)
    end
  end
  self.lots = kept
end

-- Takes `amount` of purchased credit out of the lots, in spending order (see load_lots); what the
-- free pool covers touches no lot. Call with `p` as it was before the draw.
function Meter:draw_lots(amount, p_before)
  if amount <= 0 or #self.lots == 0 then return end
  local in_lots = 0
  for _, lot in ipairs(self.lots) do in_lots = in_lots + lot.n end
  local free = math.max(0, p_before - in_lots)
  local order = {}
  for i, lot in ipairs(self.lots) do if lot.x > 0 then table.insert(order, i) end end
  table.sort(order, function(x, y) return self.lots[x].x < self.lots[y].x end)
  local left = amount
  local function take(i)
    local d = math.min(self.lots[i].n, left)
    self.lots[i].n = self.lots[i].n - d
    left = left - d
  end
  for _, i in ipairs(order) do if left > 0 then take(i) end end
  left = left - math.min(free, left)
  for i, lot in ipairs(self.lots) do if left > 0 and lot.x == 0 then take(i) end end
  local kept = {}
  for _, lot in ipairs(self.lots) do if lot.n > 0 then table.insert(kept, lot) end end
  self.lots = kept
  self.lots_dirty = true
end

function Meter:save_lots()
  if not self.lots_dirty then return end
  if #self.lots == 0 then
    redis.call('HDEL', self.key, self.m .. ':lots')
  else
    redis.call('HSET', self.key, self.m .. ':lots', cjson.encode(self.lots))
  end
  self.lots_dirty = false
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

-- Draws allocated first, then purchased. Returns the purchased part.
function Meter:charge(cost)
  if self:unlimited() then
    self.u = self.u + cost
    return 0, 0
  end
  local from_a = math.min(self.a, cost)
  local from_p = cost - from_a
  self:draw_lots(from_p, self.p)
  self.a = self.a - from_a
  self.p = self.p - from_p
  self.u = self.u + cost
  return from_a, from_p
end

-- Writes the pending events only (grant.lua: expired lots, with no period refresh).
function Meter:save_pending(events, user)
  for _, e in ipairs(self.pending) do
    e.user = user; e.meter = self.m; e.feature = ''; e.dp = e.dp or 0; e.cost = 0
    e.bal = self:balance()
    events:add(e)
  end
  self.pending = {}
end

function Meter:save(events, user, feature)
  for _, e in ipairs(self.pending) do
    e.user = user; e.meter = self.m; e.feature = feature; e.dp = e.dp or 0; e.cost = 0
    e.bal = self:balance()
    events:add(e)
  end
  self.pending = {}
  local m = self.m
  redis.call('HSET', self.key, m .. ':a', fmt(self.a), m .. ':p', fmt(self.p), m .. ':h', fmt(self.h + self.xh),
    m .. ':u', fmt(self.u), m .. ':pe', fmt(self.pe), m .. ':lim', fmt(self.lim), m .. ':ps', fmt(self.ps))
  self:save_lots()
end

-- Low-balance alerts. ARGV[26] of a gate call: thresholds, percent of the period's base (its
-- allocation plus the purchased credit it started with), e.g. '25,10,0'. The decision that takes
-- what is available to or below a threshold records one `alert` event (delta 0), in this same
-- script; `<m>:alpe`/`<m>:alt` (the period and the lowest threshold alerted in it) make it once
-- per threshold per meter per period. Called after save() so the events follow the charge.
function Meter:alerts(events, user, feature, spec)
  if spec == nil or spec == '' or self:unlimited() then return end
  local base = math.max(self.lim or 0, 0) + self.ps
  if base <= 0 then return end
  local avail = self:available()
  local v = redis.call('HMGET', self.key, self.m .. ':alpe', self.m .. ':alt')
  local lowest = 101
  if tonumber(v[1]) == self.pe then lowest = tonumber(v[2]) or 101 end
  local now_lowest = lowest
  for t in string.gmatch(spec, '%d+') do
    t = tonumber(t)
    if t < lowest and avail * 100 <= t * base then
      events:add({kind = 'alert', user = user, meter = self.m, feature = feature, delta = 0, bal = self:balance(),
        meta = cjson.encode({threshold = t, balance = avail, allocated = self.a, purchased = self.p,
          period_end = self.pe, base = base})})
      if t < now_lowest then now_lowest = t end
    end
  end
  if now_lowest ~= lowest then
    redis.call('HSET', self.key, self.m .. ':alpe', fmt(self.pe), self.m .. ':alt', fmt(now_lowest))
  end
end

-- Sub-quota of a user ('u:<id>') or team ('t:<name>') for one meter, in the org's quota hash.
-- Usage resets when the org meter's period moves on.
local Quota = {}
Quota.__index = Quota

local function load_quota(q_key, subject, meter, pe)
  if subject == nil then return nil end
  local f = subject .. ':' .. meter
  local v = redis.call('HMGET', q_key, f .. ':lim', f .. ':used', f .. ':h', f .. ':pe')
  local lim = tonumber(v[1])
  if lim == nil then return nil end
  local used = tonumber(v[2]) or 0
  if tonumber(v[4]) ~= pe then used = 0 end
  local xh = EXPIRED[f] or 0
  return setmetatable({key = q_key, f = f, lim = lim, used = used, h = (tonumber(v[3]) or 0) - xh, xh = xh,
    pe = pe, subject = subject}, Quota)
end

function Quota:available()
  return self.lim - self.used - self.h
end

function Quota:save()
  redis.call('HSET', self.key, self.f .. ':used', fmt(self.used), self.f .. ':h', fmt(self.h + self.xh),
    self.f .. ':pe', fmt(self.pe))
end

-- GCRA on the server clock. interval_us = window / limit; burst = calls allowed at once.
-- Returns allowed, new_tat, retry_after_us, remaining, reset_us.
local function gcra(key, interval_us, burst, now)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval_us
  local allow_at = new_tat - burst * interval_us
  if now < allow_at then
    return false, tat, allow_at - now, 0, tat - now
  end
  local remaining = math.floor((now - allow_at) / interval_us)
  return true, new_tat, 0, remaining, new_tat - now
end

-- Checks every configured rate limit without writing. rl = {{key, interval_us, burst}, ...}.
-- Returns ok, retry_after_ms, limit, remaining, reset_s (of the tightest limit), writes.
local function rate_limits(rl, now)
  local ok, retry, writes = true, 0, {}
  local best_limit, best_rem, best_reset = -1, -1, 0
  for _, r in ipairs(rl) do
    local allowed, tat, wait, rem, reset = gcra(r[1], r[2], r[3], now)
    if not allowed then
      ok = false
      if wait > retry then retry = wait end
    else
      table.insert(writes, {r[1], tat, reset})
    end
    if best_rem < 0 or rem < best_rem then
      best_limit, best_rem, best_reset = r[3], rem, reset
    end
  end
  return ok, math.ceil(retry / 1000), best_limit, best_rem, math.ceil(best_reset / 1000000), writes
end

local function save_rate_limits(writes)
  for _, w in ipairs(writes) do
    redis.call('SET', w[1], fmt(w[2]), 'PX', math.max(1, math.ceil(w[3] / 1000)))
  end
end

-- Reservations of an org: hash rid -> JSON record, and a zset of their expiries.
local function release_hold(bal_key, q_key, rec, now_s)
  local m = rec.m
  redis.call('HINCRBY', bal_key, m .. ':h', -rec.held)
  for _, subject in ipairs({rec.ut, rec.tt}) do
    if subject and subject ~= '' then
      redis.call('HINCRBY', q_key, subject .. ':' .. m .. ':h', -rec.held)
    end
  end
end

-- Returns one expired hold to its meter (a `release` event, reason expired) and forgets it.
local function expire_hold(rv_key, rx_key, bal_key, q_key, events, rid, rec, now_s)
  release_hold(bal_key, q_key, rec, now_s)
  local bal = (tonumber(redis.call('HGET', bal_key, rec.m .. ':a')) or 0)
    + (tonumber(redis.call('HGET', bal_key, rec.m .. ':p')) or 0)
  events:add({kind = 'release', user = rec.u, meter = rec.m, feature = rec.f, bal = bal,
    meta = cjson.encode({reservation_id = rid, held = rec.held, reason = 'expired'})})
  redis.call('HDEL', rv_key, rid)
  redis.call('ZREM', rx_key, rid)
end

-- Returns expired holds (at most `max` a call, oldest first) to their meters.
local function sweep_expired(rv_key, rx_key, bal_key, q_key, events, now, max)
  local now_s = math.floor(now / 1000000)
  local due = redis.call('ZRANGEBYSCORE', rx_key, '-inf', now_s, 'LIMIT', 0, max)
  for _, rid in ipairs(due) do
    local raw = redis.call('HGET', rv_key, rid)
    if raw then
      expire_hold(rv_key, rx_key, bal_key, q_key, events, rid, cjson.decode(raw), now_s)
    else
      redis.call('ZREM', rx_key, rid)
    end
  end
end

-- The sub-quotas a call touches (user, team), without holes (ipairs stops at a nil).
local function quotas(req)
  local qs = {}
  if req.uq then table.insert(qs, req.uq) end
  if req.tq then table.insert(qs, req.tq) end
  return qs
end

-- What the caller may still spend: the tightest of the levels (-1 unlimited).
local function remaining(req)
  local r = req.mtr:available()
  for _, q in ipairs(quotas(req)) do
    local a = math.max(0, q:available())
    if r < 0 or a < r then r = a end
  end
  return r
end

-- The gate every decision (check, consume, reserve) goes through.
-- KEYS: 1 bal, 2 quotas, 3 users, 4 rl user, 5 rl key, 6 rl org, 7 idem, 8 stream, 9 event record,
--       10 reservations, 11 reservation expiries
-- ARGV: 1 event_id, 2 org, 3 user, 4 key_id, 5 feature, 6 meter, 7 cost, 8 allocation (-1 unlimited),
--       9 period, 10 rollover, 11..16 rate limits (interval_us, burst) for user, key, org (0 = none),
--       17 auto-register users, 18 idempotency ttl s, 19 fingerprint, 20 metadata json, 21 shadow,
--       22 event record ttl s, 23 op-specific (reservation ttl s), 24 unit cost (reserve),
--       25 minimum hold (reserve: hold less than asked, down to this, when that is all there is),
--       26 low-balance alert thresholds ('25,10,0'; see Meter:alerts)
-- Returns the parsed request, the meter and levels, and a refusal (status, code, detail) or nil.
local function gate(write)
  local now = now_us()
  local now_s = math.floor(now / 1000000)
  local req = {
    id = ARGV[1], org = ARGV[2], user = ARGV[3], key = ARGV[4], feature = ARGV[5], meter = ARGV[6],
    cost = tonumber(ARGV[7]), alloc = tonumber(ARGV[8]), period = ARGV[9], rollover = ARGV[10] == '1',
    auto = ARGV[17] == '1', idem_ttl = tonumber(ARGV[18]), fp = ARGV[19], meta = ARGV[20],
    shadow = ARGV[21] == '1', rec_ttl = tonumber(ARGV[22]), extra = ARGV[23], now = now, now_s = now_s,
  }
  local events = new_events(KEYS[8], req.id, now, req.org, req.key)
  req.events = events
  if write then
    sweep_expired(KEYS[10], KEYS[11], KEYS[1], KEYS[2], events, now, 16)
  end
  note_expired(KEYS[10], KEYS[11], now_s)  -- what the sweep left (read-only: all of them)

  local refusal = nil
  -- Users: a known user may belong to a team; an unknown one is registered (or refused).
  local team = ''
  if req.user ~= '' then
    local t = redis.call('HGET', KEYS[3], req.user)
    if t then
      team = t
    elseif req.auto then
      if write then redis.call('HSET', KEYS[3], req.user, '') end
    else
      refusal = {403, 'forbidden', 'unknown user ' .. req.user}
    end
  end
  req.team = team

  local rl = {}
  local rl_keys = {KEYS[4], KEYS[5], KEYS[6]}
  for i = 0, 2 do
    local interval = tonumber(ARGV[11 + 2 * i])
    if interval > 0 and not (i == 0 and req.user == '') then
      table.insert(rl, {rl_keys[i + 1], interval, tonumber(ARGV[12 + 2 * i])})
    end
  end
  local rl_ok, retry_ms, rl_limit, rl_rem, rl_reset, rl_writes = rate_limits(rl, now)
  req.rl = {rl_limit, rl_rem, rl_reset, retry_ms}
  req.rl_writes = rl_writes
  if not refusal and not rl_ok then
    refusal = {429, 'rate_limited', 'rate limit exceeded; retry in ' .. retry_ms .. ' ms'}
  end

  local meter = load_meter(KEYS[1], req.meter)
  meter:refresh(req.alloc, req.period, req.rollover, now_s)
  meter:expire_lots(now_s)
  req.mtr = meter
  if not refusal and meter.lim == 0 and meter.p <= 0 and meter.pt <= 0 then
    refusal = {403, 'plan_forbids', req.meter .. ' is not available on your plan'}
  end
  local levels = {}
  local uq = nil
  local tq = nil
  if req.user ~= '' then uq = load_quota(KEYS[2], 'u:' .. req.user, req.meter, meter.pe) end
  if team ~= '' then tq = load_quota(KEYS[2], 't:' .. team, req.meter, meter.pe) end
  req.uq, req.tq = uq, tq
  -- A flexible hold (LLM max_tokens): take what every level can afford, if at least the minimum.
  local min_cost = tonumber(ARGV[25]) or 0
  if min_cost > 0 then
    local cap = remaining(req)
    if cap >= 0 and req.cost > cap and cap >= min_cost then req.cost = cap end
  end
  if not refusal and not meter:unlimited() and req.cost > meter:available() then
    refusal = {402, 'insufficient_balance', 'balance of ' .. req.meter .. ' is ' .. meter:available()
      .. ', the call costs ' .. req.cost}
  end
  if not refusal and tq and req.cost > tq:available() then
    refusal = {402, 'insufficient_balance', 'team ' .. team .. ' quota of ' .. req.meter .. ' has '
      .. math.max(0, tq:available()) .. ' left, the call costs ' .. req.cost}
  end
  if not refusal and uq and req.cost > uq:available() then
    refusal = {402, 'insufficient_balance', 'user ' .. req.user .. ' quota of ' .. req.meter .. ' has '
      .. math.max(0, uq:available()) .. ' left, the call costs ' .. req.cost}
  end
  return req, refusal
end

-- Reply layout shared by every decision: status, code, detail, cost, remaining, event_id,
-- retry_after_ms, rl_limit, rl_remaining, rl_reset_s, replay, would (shadow), extra json.
local function reply(req, status, code, detail, cost, rem, event_id, would, extra)
  local rl = req.rl or {-1, -1, 0, 0}
  return {status, code or '', detail or '', cost, rem, event_id or '', rl[4], rl[1], rl[2], rl[3], 0,
    would or '', extra or ''}
end

-- Returns the stored answer of an idempotent retry, or nil. An empty fingerprint: no key given.
local function replay(idem_key, fp)
  if fp == '' then return nil end
  local stored = redis.call('GET', idem_key)
  if not stored then return nil end
  local r = cjson.decode(stored)
  if r.fp ~= fp then
    return {422, 'invalid_request', 'idempotency key reused with a different request', 0, -1, '',
      0, -1, -1, 0, 1, '', ''}
  end
  r.reply[11] = 1
  return r.reply
end

local function remember(idem_key, fp, ttl, rep)
  if fp == '' then return end
  redis.call('SET', idem_key, cjson.encode({fp = fp, reply = rep}), 'EX', ttl)
end

-- A refusal: nothing changes but one `denied` event (delta 0). In shadow mode the call
-- passes, uncharged, and the answer says what would have happened.
local function refuse(req, refusal)
  req.events:add({id = req.id, kind = 'denied', user = req.user, meter = req.meter, feature = req.feature,
    delta = 0, cost = 0, bal = req.mtr:balance(),
    meta = cjson.encode({code = refusal[2], status = refusal[1], cost = req.cost})})
  if req.shadow then
    return reply(req, 200, '', '', 0, remaining(req), req.id, refusal[2])
  end
  return reply(req, refusal[1], refusal[2], refusal[3], req.cost, remaining(req), req.id)
end

-- Settling a reservation (commit, release) happens once; a retry gets the first answer.
-- KEYS: 1 bal, 2 quotas, 3 reservations, 4 expiries, 5 stream, 6 settled-answer key,
--       7 event record (commit only)
-- ARGV: 1 reservation id, 2 event id, 3 org, 4 key_id, 5 units, 6 answer ttl s, 7 record ttl s, 8 metadata,
--       9 fingerprint of the request (a retry with a different body is 409, not the first answer),
--       10 commit only: '1' charges usage beyond the hold (the sidecar)
local SETTLED = {commit = 'committed', release = 'released'}  -- an op's past tense, for messages

local function settle_start(op)
  local rid = ARGV[1]
  local done = redis.call('GET', KEYS[6])
  if done then
    local d = cjson.decode(done)
    if d.op ~= op then
      return nil, nil, {409, 'conflict', 'reservation already ' .. SETTLED[d.op], 0, -1, '', 0, -1, -1, 0, 1, '', ''}
    end
    if d.fp and (ARGV[9] or '') ~= '' and d.fp ~= ARGV[9] then
      return nil, nil, {409, 'conflict', 'reservation already settled by a different ' .. op .. ' request',
        0, -1, '', 0, -1, -1, 0, 1, '', ''}
    end
    d.reply[11] = 1
    return nil, nil, d.reply
  end
  local now = now_us()
  local now_s = math.floor(now / 1000000)
  local events = new_events(KEYS[5], ARGV[2], now, ARGV[3], ARGV[4])
  sweep_expired(KEYS[3], KEYS[4], KEYS[1], KEYS[2], events, now, 16)
  local raw = redis.call('HGET', KEYS[3], rid)
  local rec = raw and cjson.decode(raw)
  local expires = tonumber(redis.call('ZSCORE', KEYS[4], rid))  -- as the sweep reads it
  if rec and expires and now_s >= expires then
    -- Past its expiry: gone, swept or not, so the answer is the same whatever ran before.
    expire_hold(KEYS[3], KEYS[4], KEYS[1], KEYS[2], events, rid, rec, now_s)
    rec = nil
  end
  if not rec then
    return nil, nil, {404, 'not_found', 'reservation ' .. rid .. ' not found or expired', 0, -1, '', 0, -1, -1, 0, 0, '', ''}
  end
  release_hold(KEYS[1], KEYS[2], rec, now_s)
  redis.call('HDEL', KEYS[3], rid)
  redis.call('ZREM', KEYS[4], rid)
  note_expired(KEYS[3], KEYS[4], now_s)
  return rec, events, nil
end

local function settle_finish(op, rep)
  redis.call('SET', KEYS[6], cjson.encode({op = op, fp = ARGV[9] or '', reply = rep}), 'EX', tonumber(ARGV[6]))
  return rep
end
