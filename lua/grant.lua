-- grant / purchase / adjust / revoke: changes purchased credit (never below zero), once per
-- idempotency key. A purchase has two keys (its Stripe event and its checkout session): either
-- one seen is a replay (idem2, optional). Credit that expires or must be traced becomes a lot
-- (see decode_lots): lot_id ('' none), lot_expiry ('' never; unix s, or '+<s>' from now).
-- take_lot = 'take_lot': take back what is left of lot lot_id (a refunded purchase; amount is
-- what it gave, the rest is recorded as `lost`). reservations/expiries: the answer's balance.
local k = bind(KEYS, {'bal', 'idem', 'stream', 'reservations', 'expiries', 'idem2'})
local a = bind(ARGV, {'event_id', 'org', 'meter', 'amount', 'kind', 'metadata', 'idem_ttl_s', 'fingerprint',
  'actor_key_id', 'user', 'lot_id', 'lot_expiry', 'take_lot'})

local idem = replay(k.idem, a.fingerprint)
if idem then return idem end
if k.idem2 then
  idem = replay(k.idem2, a.fingerprint)
  if idem then return idem end
end
local now = now_us()
local now_s = floor(now / 1000000)
local events = new_events(k.stream, a.event_id, now, a.org, a.actor_key_id)
local m = load_meter(k.bal, a.meter, expired_holds(k.reservations, k.expiries, now_s))
m:expire_lots(now_s)
m:save_pending(events, a.user, '')
local lot_id = a.lot_id or ''
local amount = tonumber(a.amount)
local meta = a.metadata
local delta
if a.take_lot == 'take_lot' then
  local left = 0
  local kept = {}
  for _, lot in ipairs(m.lots) do
    if lot.i == lot_id then left = left + lot.n else insert(kept, lot) end
  end
  m.lots = kept
  m.lots_dirty = true
  delta = -min(left, m.p)
  local md = json_decode(meta)
  md.taken = -delta
  md.lost = max(0, amount + delta)
  meta = json_encode(md)
else
  delta = max(amount, -m.p)
  if delta < 0 then m:draw_lots(-delta, m.p) end
end
local x = a.lot_expiry or ''
if delta > 0 and (lot_id ~= '' or x ~= '') then
  local exp = 0
  if sub(x, 1, 1) == '+' then exp = now_s + tonumber(sub(x, 2)) elseif x ~= '' then exp = tonumber(x) end
  insert(m.lots, {i = lot_id ~= '' and lot_id or a.event_id, n = delta, x = exp})
  m.lots_dirty = true
  local md = json_decode(meta)
  if exp > 0 then md.expires_at = exp end
  meta = json_encode(md)
end
m.p = m.p + delta
call('HSET', k.bal, m.f.purchased, m.p)
m:save_lots()
if delta > 0 then call('HINCRBY', k.bal, m.f.purchased_total, delta) end
local id = events:add({id = a.event_id, kind = a.kind, user = a.user, meter = a.meter, feature = '',
  delta = delta, dp = delta, cost = 0, bal = m:balance(), meta = meta})
local rep = reply{status = 201, cost = delta, remaining = m:available(), event_id = id}
remember(k.idem, a.fingerprint, tonumber(a.idem_ttl_s), rep)
if k.idem2 then remember(k.idem2, a.fingerprint, tonumber(a.idem_ttl_s), rep) end
return rep
