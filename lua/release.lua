-- release: returns the whole hold, charges nothing.

-- The usual one straight through (usual_release); it writes nothing when it does not decide.
local usual = usual_release(KEYS, ARGV)
if usual then return usual end
local k = bind(KEYS, SETTLE_KEYS)
local a = bind(ARGV, SETTLE_ARGV)

local s, early = settle_start('release', k, a)
if early then return early end
local rec = s.rec

local m = load_meter(k.bal, rec.m, s.expired)
local id = s.events:add({id = a.event_id, kind = 'release', user = rec.u, meter = rec.m, feature = rec.f,
  delta = 0, cost = 0, bal = m:balance(),
  meta = json_encode({reservation_id = a.reservation_id, held = rec.held, reason = 'released'})})
return settle_finish('release', k, a, reply{remaining = m:available(), event_id = id,
  extra = json_encode({released = rec.held})})
