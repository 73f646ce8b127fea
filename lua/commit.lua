-- commit: charges the actual cost (units x the unit cost fixed at reserve time) and returns
-- the rest of the hold. Up to the hold it is charged as far as the balance goes. Beyond the
-- hold (ARGV[10] = '1', the sidecar: the upstream already did the work) it is charged as far as
-- what no other hold has taken goes, at every level (org, team, user), never below zero;
-- without ARGV[10] a commit never charges more than the hold (the decision API's contract).
-- What could not be charged is the commit event's `overage` (its metadata). KEYS/ARGV: see
-- settle_start() (ARGV[9] is the fingerprint), and ARGV[10] above.
local rec, events, early = settle_start('commit')
if early then return early end

local m = load_meter(KEYS[1], rec.m)
local want = tonumber(ARGV[5]) * rec.unit
local beyond = ARGV[10] == '1'
local qs = {}
for _, subject in ipairs({rec.ut, rec.tt}) do
  if subject ~= '' then
    local q = load_quota(KEYS[2], subject, rec.m, m.pe)
    if q then table.insert(qs, q) end
  end
end
local cost = math.min(want, rec.held)
if not m:unlimited() then cost = math.min(cost, m:balance()) end
if beyond and want > cost and cost == rec.held then
  -- The hold is back in `available` (settle_start released it); other holds stay covered.
  local room = want - cost
  if not m:unlimited() then room = math.min(room, m:available() - cost) end
  for _, q in ipairs(qs) do room = math.min(room, q:available() - cost) end
  if room > 0 then cost = cost + room end
end
local from_a, from_p = m:charge(cost)
for _, q in ipairs(qs) do q.used = q.used + cost; q:save() end
m.pending = {}
redis.call('HSET', KEYS[1], rec.m .. ':a', fmt(m.a), rec.m .. ':p', fmt(m.p), rec.m .. ':u', fmt(m.u))
m:save_lots()
local meta = {reservation_id = ARGV[1], held = rec.held, requested = want}
if want > cost then meta.overage = want - cost end
if ARGV[8] ~= '' then meta.request = cjson.decode(ARGV[8]) end
local id = events:add({id = ARGV[2], kind = 'commit', user = rec.u, meter = rec.m, feature = rec.f,
  delta = -(from_a + from_p), dp = -from_p, cost = cost, bal = m:balance(), meta = cjson.encode(meta)})
-- Nothing is kept for a refund: it reads this event back (refund.lua).
local available = m:available()
return settle_finish('commit', {200, '', '', cost, available, id, 0, -1, -1, 0, 0, '',
  cjson.encode({released = math.max(0, rec.held - cost), overage = math.max(0, want - cost), meter = rec.m,
    feature = rec.f})})
