-- commit: charges the actual cost (units x the unit cost fixed at reserve time, never more than
-- the hold) and returns the rest of the hold. KEYS/ARGV: see settle_start().
local rec, events, early = settle_start('commit')
if early then return early end

local m = load_meter(KEYS[1], rec.m)
local want = tonumber(ARGV[5]) * rec.unit
local cost = math.min(want, rec.held)
if not m:unlimited() then cost = math.min(cost, m:balance()) end
local from_a, from_p = m:charge(cost)
local pe = m.pe
for _, subject in ipairs({rec.ut, rec.tt}) do
  if subject ~= '' then
    local q = load_quota(KEYS[2], subject, rec.m, pe)
    if q then q.used = q.used + cost; q:save() end
  end
end
m.pending = {}
redis.call('HSET', KEYS[1], rec.m .. ':a', fmt(m.a), rec.m .. ':p', fmt(m.p), rec.m .. ':u', fmt(m.u))
local meta = {reservation_id = ARGV[1], held = rec.held, requested = want}
if ARGV[8] ~= '' then meta.request = cjson.decode(ARGV[8]) end
local id = events:add({id = ARGV[2], kind = 'commit', user = rec.u, meter = rec.m, feature = rec.f,
  delta = -(from_a + from_p), dp = -from_p, cost = cost, bal = m:balance(), meta = cjson.encode(meta)})
redis.call('SET', KEYS[7], cjson.encode({m = rec.m, a = from_a, p = from_p, cost = cost, u = rec.u,
  f = rec.f, pe = pe, ut = rec.ut, tt = rec.tt}), 'EX', tonumber(ARGV[7]))
local available = m:available()
return settle_finish('commit', {200, '', '', cost, available, id, 0, -1, -1, 0, 0, '',
  cjson.encode({released = rec.held - cost, meter = rec.m, feature = rec.f})})
