-- grant / purchase / adjust / revoke: changes purchased credit (never below zero), once per
-- idempotency key. A purchase has two keys (its Stripe event and its checkout session): either
-- one seen is a replay. Credit that expires or must be traced becomes a lot (see load_lots).
-- KEYS: 1 bal, 2 idem, 3 stream, 4 reservations, 5 reservation expiries (the answer's balance),
--       6 second idem key (optional)
-- ARGV: 1 event id, 2 org, 3 meter, 4 amount (signed), 5 kind, 6 metadata, 7 idem ttl, 8 fingerprint,
--       9 actor key id, 10 user, 11 lot id ('' none), 12 lot expiry ('' never; unix s, or '+<s>'
--       from now), 13 'take_lot': take back what is left of lot ARGV[11] (a refunded purchase;
--       ARGV[4] is what it gave, the rest is recorded as `lost`)
local idem = replay(KEYS[2], ARGV[8])
if idem then return idem end
if KEYS[6] then
  idem = replay(KEYS[6], ARGV[8])
  if idem then return idem end
end
local now = now_us()
local now_s = math.floor(now / 1000000)
local events = new_events(KEYS[3], ARGV[1], now, ARGV[2], ARGV[9])
note_expired(KEYS[4], KEYS[5], now_s)
local m = load_meter(KEYS[1], ARGV[3])
m:expire_lots(now_s)
m:save_pending(events, ARGV[10])
local lot_id = ARGV[11] or ''
local meta = ARGV[6]
local delta
if ARGV[13] == 'take_lot' then
  local left = 0
  local kept = {}
  for _, lot in ipairs(m.lots) do
    if lot.i == lot_id then left = left + lot.n else table.insert(kept, lot) end
  end
  m.lots = kept
  m.lots_dirty = true
  delta = -math.min(left, m.p)
  local md = cjson.decode(meta)
  md.taken = -delta
  md.lost = math.max(0, tonumber(ARGV[4]) + delta)
  meta = cjson.encode(md)
else
  delta = math.max(tonumber(ARGV[4]), -m.p)
  if delta < 0 then m:draw_lots(-delta, m.p) end
end
local x = ARGV[12] or ''
if delta > 0 and (lot_id ~= '' or x ~= '') then
  local exp = 0
  if string.sub(x, 1, 1) == '+' then exp = now_s + tonumber(string.sub(x, 2)) elseif x ~= '' then exp = tonumber(x) end
  table.insert(m.lots, {i = lot_id ~= '' and lot_id or ARGV[1], n = delta, x = exp})
  m.lots_dirty = true
  local md = cjson.decode(meta)
  if exp > 0 then md.expires_at = exp end
  meta = cjson.encode(md)
end
m.p = m.p + delta
redis.call('HSET', KEYS[1], ARGV[3] .. ':p', fmt(m.p))
m:save_lots()
if delta > 0 then redis.call('HINCRBY', KEYS[1], ARGV[3] .. ':pt', delta) end
local id = events:add({id = ARGV[1], kind = ARGV[5], user = ARGV[10], meter = ARGV[3], feature = '',
  delta = delta, dp = delta, cost = 0, bal = m:balance(), meta = meta})
local rep = {201, '', '', delta, m:available(), id, 0, -1, -1, 0, 0, '', ''}
remember(KEYS[2], ARGV[8], tonumber(ARGV[7]), rep)
if KEYS[6] then remember(KEYS[6], ARGV[8], tonumber(ARGV[7]), rep) end
return rep
