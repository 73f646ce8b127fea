-- refund: puts back what one consume/commit took, once per event inside the refund window. The
-- allocated part goes back only within the same period (a new period has refilled the
-- allocation already). A charge leaves nothing in Redis for its refund: its facts come from the
-- charged event itself (the gateway read it from the ledger, or from the stream when not drained
-- yet: see charges.py), and the only state is the guard KEYS[3], written here, kept until the
-- window closes. Team and user quotas: the user's quota and current team's quota, as a rebuild
-- derives them.
-- KEYS: 1 bal, 2 quotas, 3 refund guard of the refunded event, 4 stream, 5 reservations,
--       6 reservation expiries (the answer's remaining), 7 users (the charged user's team),
--       8 the event's refund record as versions before the guard wrote it (a refund there is the
--       guard; such records expire within refund_window_s of the upgrade)
-- ARGV: 1 refunded event id, 2 refund event id, 3 org, 4 key_id, 5 metadata, 6 fingerprint,
--       7 meter, 8 allocated part, 9 purchased part, 10 cost, 11 user, 12 feature (of the charge),
--       13 charge time (unix us), 14 period spec of the plan, 15 refund window s
local guard = redis.call('GET', KEYS[3])
local old = not guard and redis.call('GET', KEYS[8])
if old then
  old = cjson.decode(old)
  if old.refunded then guard = cjson.encode({fp = old.refunded_fp or '', r = old.refunded}) end
end
if guard then
  local g = cjson.decode(guard)
  if not g.r then  -- restored by a rebuild: refunded before it, the answer is gone
    return {404, 'not_found', 'no refundable event ' .. ARGV[1], 0, -1, '', 0, -1, -1, 0, 0, '', ''}
  end
  if g.fp ~= (ARGV[6] or '') then
    return {409, 'conflict', 'event ' .. ARGV[1] .. ' already refunded by a different request',
      0, -1, '', 0, -1, -1, 0, 1, '', ''}
  end
  g.r[11] = 1
  return g.r
end
local now = now_us()
local closes = tonumber(ARGV[13]) + tonumber(ARGV[15]) * 1000000
if now >= closes then
  return {404, 'not_found', 'no refundable event ' .. ARGV[1], 0, -1, '', 0, -1, -1, 0, 0, '', ''}
end
local rec = {m = ARGV[7], a = tonumber(ARGV[8]), p = tonumber(ARGV[9]), cost = tonumber(ARGV[10]),
  u = ARGV[11], f = ARGV[12], pe = period_end(ARGV[14], math.floor(tonumber(ARGV[13]) / 1000000)),
  ut = '', tt = ''}
if rec.u ~= '' then
  rec.ut = 'u:' .. rec.u
  local team = redis.call('HGET', KEYS[7], rec.u)
  if team and team ~= '' then rec.tt = 't:' .. team end
end
local events = new_events(KEYS[4], ARGV[2], now, ARGV[3], ARGV[4])
note_expired(KEYS[5], KEYS[6], math.floor(now / 1000000))
local m = load_meter(KEYS[1], rec.m)
local back_a = 0
if rec.pe == m.pe then
  back_a = rec.a
  m.u = math.max(0, m.u - rec.cost)
  for _, subject in ipairs({rec.ut, rec.tt}) do
    if subject ~= '' then
      local q = load_quota(KEYS[2], subject, rec.m, m.pe)
      if q then q.used = math.max(0, q.used - rec.cost); q:save() end
    end
  end
end
m.a = m.a + back_a
m.p = m.p + rec.p
redis.call('HSET', KEYS[1], rec.m .. ':a', fmt(m.a), rec.m .. ':p', fmt(m.p), rec.m .. ':u', fmt(m.u))
local meta = {refund_of = ARGV[1]}
if ARGV[5] ~= '' then meta.request = cjson.decode(ARGV[5]) end
local id = events:add({id = ARGV[2], kind = 'refund', user = rec.u, meter = rec.m, feature = rec.f,
  delta = back_a + rec.p, dp = rec.p, cost = -rec.cost, bal = m:balance(), meta = cjson.encode(meta)})
local rep = {200, '', '', back_a + rec.p, m:available(), id, 0, -1, -1, 0, 0, '', ''}
redis.call('SET', KEYS[3], cjson.encode({fp = ARGV[6] or '', r = rep}), 'PXAT', fmt(math.ceil(closes / 1000)))
return rep
