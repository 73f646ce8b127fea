-- grant / purchase / adjust: changes purchased credit (never below zero), once per idempotency key.
-- A purchase has two keys (its Stripe event and its checkout session): either one seen is a replay.
-- KEYS: 1 bal, 2 idem, 3 stream, 4 reservations, 5 reservation expiries (the answer's balance),
--       6 second idem key (optional)
-- ARGV: 1 event id, 2 org, 3 meter, 4 amount (signed), 5 kind, 6 metadata, 7 idem ttl, 8 fingerprint,
--       9 actor key id, 10 user
local idem = replay(KEYS[2], ARGV[8])
if idem then return idem end
if KEYS[6] then
  idem = replay(KEYS[6], ARGV[8])
  if idem then return idem end
end
local now = now_us()
local events = new_events(KEYS[3], ARGV[1], now, ARGV[2], ARGV[9])
note_expired(KEYS[4], KEYS[5], math.floor(now / 1000000))
local m = load_meter(KEYS[1], ARGV[3])
local delta = math.max(tonumber(ARGV[4]), -m.p)
m.p = m.p + delta
redis.call('HSET', KEYS[1], ARGV[3] .. ':p', fmt(m.p))
if delta > 0 then redis.call('HINCRBY', KEYS[1], ARGV[3] .. ':pt', delta) end
local id = events:add({id = ARGV[1], kind = ARGV[5], user = ARGV[10], meter = ARGV[3], feature = '',
  delta = delta, dp = delta, cost = 0, bal = m:balance(), meta = ARGV[6]})
local rep = {201, '', '', delta, m:available(), id, 0, -1, -1, 0, 0, '', ''}
remember(KEYS[2], ARGV[8], tonumber(ARGV[7]), rep)
if KEYS[6] then remember(KEYS[6], ARGV[8], tonumber(ARGV[7]), rep) end
return rep
