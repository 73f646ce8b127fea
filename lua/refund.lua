-- refund: puts back what one consume/commit took, once per event inside the refund window. The
-- allocated part goes back only within the same period (a new period has refilled the
-- allocation already). A charge leaves nothing in Redis for its refund: its facts come from the
-- charged event itself (the gateway read it from the ledger, or from the stream when not drained
-- yet: see charges.py), and the only state is the guard, written here, kept until the window
-- closes. Team and user quotas: the user's quota and current team's quota, as a rebuild derives
-- them. legacy_record: the event's refund record as versions before the guard wrote it (a refund
-- there is the guard; such records expire within refund_window_s of the upgrade). The charge:
-- meter, its allocated and purchased parts, cost, user, feature, time (unix us); period: the
-- plan's period spec. sources: the charge's split (Meter:waterfall); each layer gets its share
-- back, a grant only while its lot has not expired (an expired grant's share is `lost`). An
-- event without sources (written before they were) gives its purchased part to the free pool.
local k = bind(KEYS, {'bal', 'quotas', 'guard', 'stream', 'reservations', 'expiries', 'legacy_record'})
local a = bind(ARGV, {'refunded_event_id', 'event_id', 'org', 'key_id', 'metadata', 'fingerprint', 'meter',
  'allocated', 'purchased', 'cost', 'user', 'feature', 'charged_at_us', 'period', 'refund_window_s', 'sources'})

local guard = call('GET', k.guard)
local old = not guard and call('GET', k.legacy_record)
if old then
  old = json_decode(old)
  if old.refunded then guard = json_encode({fp = old.refunded_fp or '', r = old.refunded}) end
end
if guard then
  local g = json_decode(guard)
  if not g.r then  -- restored by a rebuild: refunded before it, the answer is gone
    return reply{status = 404, code = 'not_found', detail = 'no refundable event ' .. a.refunded_event_id}
  end
  if g.fp ~= (a.fingerprint or '') then
    return reply{status = 409, code = 'conflict',
      detail = 'event ' .. a.refunded_event_id .. ' already refunded by a different request', replay = 1}
  end
  return replayed(g.r)
end
local now = now_us()
local charged_at = tonumber(a.charged_at_us)
local closes = charged_at + tonumber(a.refund_window_s) * 1000000
if now >= closes then
  return reply{status = 404, code = 'not_found', detail = 'no refundable event ' .. a.refunded_event_id}
end
local rec = {m = a.meter, a = tonumber(a.allocated), p = tonumber(a.purchased), cost = tonumber(a.cost),
  u = a.user, f = a.feature, pe = period_end(a.period, floor(charged_at / 1000000)), ut = '', tt = ''}
if rec.u ~= '' then
  rec.ut = 'u:' .. rec.u
  local team = call('HGET', k.bal, USER_PREFIX .. rec.u .. TEAM_SUFFIX)
  if team and team ~= '' then rec.tt = 't:' .. team end
end
local events = new_events(k.stream, a.event_id, now, a.org, a.key_id)
local expired = expired_holds(k.reservations, k.expiries, floor(now / 1000000))
local m = load_meter(k.bal, rec.m, expired)
local back_a = 0
if rec.pe == m.pe then
  back_a = rec.a
  m.u = max(0, m.u - rec.cost)
  for _, q in ipairs(load_quotas(k.quotas, rec, rec.m, m.pe, expired)) do
    q.used = max(0, q.used - rec.cost); q:save()
  end
end
m.a = m.a + back_a
local back_p, lost, back = rec.p, 0, {}
if back_a > 0 then insert(back, 'allocated:' .. fmt(back_a)) end
if (a.sources or '') ~= '' then
  back_p = 0
  local now_s = floor(now / 1000000)
  for layer, n in gmatch(a.sources, '([^,]+):(%d+)') do
    n = tonumber(n)
    if layer == 'purchased' then
      back_p = back_p + n
      insert(back, layer .. ':' .. fmt(n))
    elseif sub(layer, 1, 6) == 'grant:' then
      local id, lot = sub(layer, 7), nil
      for _, l in ipairs(m.lots) do if l.i == id and l.x > now_s then lot = l end end
      if lot then
        lot.n = lot.n + n
        m.lots_dirty = true
        back_p = back_p + n
        insert(back, layer .. ':' .. fmt(n))
      else
        lost = lost + n
      end
    end
  end
elseif back_p > 0 then
  insert(back, 'purchased:' .. fmt(back_p))
end
m.p = m.p + back_p
m:save_spend()
local meta = {refund_of = a.refunded_event_id}
if lost > 0 then meta.lost = lost end
if a.metadata ~= '' then meta.request = json_decode(a.metadata) end
local id = events:add({id = a.event_id, kind = 'refund', user = rec.u, meter = rec.m, feature = rec.f,
  delta = back_a + back_p, dp = back_p, cost = -rec.cost, bal = m:balance(), meta = json_encode(meta),
  src = concat(back, ',')})
local rep = reply{cost = back_a + back_p, remaining = m:available(), event_id = id, sources = concat(back, ',')}
call('SET', k.guard, json_encode({fp = a.fingerprint or '', r = rep}), 'PXAT', ceil(closes / 1000))
return rep
