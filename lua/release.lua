-- release: returns the whole hold, charges nothing. KEYS/ARGV: see settle_start().
local rec, events, early = settle_start('release')
if early then return early end

local m = load_meter(KEYS[1], rec.m)
local id = events:add({id = ARGV[2], kind = 'release', user = rec.u, meter = rec.m, feature = rec.f,
  delta = 0, cost = 0, bal = m:balance(),
  meta = cjson.encode({reservation_id = ARGV[1], held = rec.held, reason = 'released'})})
return settle_finish('release', {200, '', '', 0, m:available(), id, 0, -1, -1, 0, 0, '',
  cjson.encode({released = rec.held})})
