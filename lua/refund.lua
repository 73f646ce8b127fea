-- refund: puts back what one consume/commit took, once. The allocated part goes back only
-- within the same period (a new period has refilled the allocation already).
local k = bind(KEYS, {'bal', 'quotas', 'record', 'stream', 'reservations', 'expiries'})
local a = bind(ARGV, {'refunded_event_id', 'event_id', 'org', 'key_id', 'metadata', 'fingerprint'})

local raw = redis.call('GET', k.record)
if not raw then
  return reply{status = 404, code = 'not_found', detail = 'no refundable event ' .. a.refunded_event_id}
end
local rec = cjson.decode(raw)
if rec.refunded then
  if rec.refunded_fp and rec.refunded_fp ~= (a.fingerprint or '') then
    return reply{status = 409, code = 'conflict',
      detail = 'event ' .. a.refunded_event_id .. ' already refunded by a different request', replay = 1}
  end
  return replayed(rec.refunded)
end
local now = now_us()
local events = new_events(k.stream, a.event_id, now, a.org, a.key_id)
local expired = expired_holds(k.reservations, k.expiries, math.floor(now / 1000000))
local m = load_meter(k.bal, rec.m, expired)
local back_a = 0
if rec.pe == m.pe then
  back_a = rec.a
  m.u = math.max(0, m.u - rec.cost)
  for _, q in ipairs(load_quotas(k.quotas, rec, rec.m, m.pe, expired)) do
    q.used = math.max(0, q.used - rec.cost); q:save()
  end
end
m.a = m.a + back_a
m.p = m.p + rec.p
m:save_spend()
local meta = {refund_of = a.refunded_event_id}
if a.metadata ~= '' then meta.request = cjson.decode(a.metadata) end
local id = events:add({id = a.event_id, kind = 'refund', user = rec.u, meter = rec.m, feature = rec.f,
  delta = back_a + rec.p, dp = rec.p, cost = -rec.cost, bal = m:balance(), meta = cjson.encode(meta)})
local rep = reply{cost = back_a + rec.p, remaining = m:available(), event_id = id}
rec.refunded = rep
rec.refunded_fp = a.fingerprint or ''
redis.call('SET', k.record, cjson.encode(rec), 'KEEPTTL')
return rep
