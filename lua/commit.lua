-- commit: charges the actual cost (units x the unit cost fixed at reserve time) and returns
-- the rest of the hold. Up to the hold it is charged as far as the balance goes. Beyond the
-- hold (beyond_hold = '1', the sidecar: the upstream already did the work) it is charged as far
-- as what no other hold has taken goes, at every level (org, team, user), never below zero;
-- without it a commit never charges more than the hold (the decision API's contract).
-- What could not be charged is the commit event's `overage` (its metadata).

-- The usual one straight through (usual_commit); it writes nothing when it does not decide.
local usual = usual_commit(KEYS, ARGV)
if usual then return usual end
local k = bind(KEYS, SETTLE_KEYS)
local a = bind(ARGV, SETTLE_ARGV)

local s, early = settle_start('commit', k, a)
if early then return early end
local rec, events = s.rec, s.events

local m = load_meter(k.bal, rec.m, s.expired)
-- Credit lots past their expiry lapse first (their `expire` events), as for a consume: a hold
-- taken while a grant was live does not make the grant spendable after it.
m:expire_lots(s.now_s)
-- A hold past a rate window (rec.co, its price multiple) is charged from credit only, at that multiple.
local want = tonumber(a.units) * rec.unit * (rec.co or 1)
local qs = load_quotas(k.quotas, rec, rec.m, m.pe, s.expired)
local cost = min(want, rec.held)
if not m:unlimited() then cost = min(cost, rec.co and m.p or m:balance()) end
if a.beyond_hold == '1' and want > cost and cost == rec.held then
  -- The hold is back in `available` (settle_start released it); other holds stay covered.
  local room = want - cost
  if not m:unlimited() then room = min(room, m:available() - cost, rec.co and m.p - cost or room) end
  for _, q in ipairs(qs) do room = min(room, q:available() - cost) end
  if room > 0 then cost = cost + room end
end
local from_a, from_p, src = m:charge(cost, rec.co ~= nil, rec.o)
for _, q in ipairs(qs) do q.used = q.used + cost; q:save() end
m:save_spend()
m:save_pending(events, rec.u, rec.f)
-- The meta (the hold, what was asked, the overage, the caller's metadata as given): usual_commit's text.
local id = events:add({id = a.event_id, kind = 'commit', user = rec.u, meter = rec.m, feature = rec.f,
  delta = -(from_a + from_p), dp = -from_p, cost = cost, bal = m:balance(), src = src,
  meta = commit_meta(json_encode(a.reservation_id), rec.held, want, cost, a.metadata)})
-- Low-balance alerts are judged here, on the actual charge, as consume judges its own: a hold
-- changes no balance (its reserve event's delta is 0) and may be released unspent, so reserve
-- records none. Not once the period is over: the next decision starts a new one. No threshold
-- crossed: no Redis call (Meter:alerts reads the marks load_meter already has).
if m.pe and s.now_s < m.pe then m:alerts(events, rec.u, rec.f, a.alert_thresholds) end
-- Nothing is kept for a refund: it reads this event back (refund.lua).
return settle_finish('commit', k, a, reply{cost = cost, remaining = m:available(), event_id = id, sources = src,
  extra = json_encode({released = max(0, rec.held - cost), overage = max(0, want - cost),
    meter = rec.m, feature = rec.f})})
