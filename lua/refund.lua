-- refund: puts back what one consume/commit took, once. The allocated part goes back only
-- within the same period (a new period has refilled the allocation already).
-- KEYS: 1 bal, 2 quotas, 3 record of the refunded event, 4 stream, 5 reservations,
--       6 reservation expiries (the answer's remaining)
-- ARGV: 1 refunded event id, 2 refund event id, 3 org, 4 key_id, 5 metadata, 6 fingerprint
local raw = redis.call('GET', KEYS[3])
if not raw then
  return {404, 'not_found', 'no refundable event ' .. ARGV[1], 0, -1, '', 0, -1, -1, 0, 0, '', ''}
end
local rec = cjson.decode(raw)
if rec.refunded then
  if rec.refunded_fp and rec.refunded_fp ~= (ARGV[6] or '') then
    return {409, 'conflict', 'event ' .. ARGV[1] .. ' already refunded by a different request',
      0, -1, '', 0, -1, -1, 0, 1, '', ''}
  end
  rec.refunded[11] = 1
  return rec.refunded
end
local now = now_us()
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
rec.refunded = rep
rec.refunded_fp = ARGV[6] or ''
redis.call('SET', KEYS[3], cjson.encode(rec), 'KEEPTTL')
return rep
