-- balance: every meter of one org as a decision would see it now (period refresh applied in
-- memory only; holds past their expiry left out, swept or not). KEYS: 1 bal, 2 reservations,
-- 3 reservation expiries. ARGV: (meter, allocation, period, rollover) repeated.
-- Returns per meter: a, p, h, u, pe, lim, pt, ps, next expiry (unix s, 0 none), its amount.
local now_s = math.floor(now_us() / 1000000)
note_expired(KEYS[2], KEYS[3], now_s)
local out = {}
for i = 1, #ARGV, 4 do
  local m = load_meter(KEYS[1], ARGV[i])
  m:refresh(tonumber(ARGV[i + 1]), ARGV[i + 2], ARGV[i + 3] == '1', now_s)
  m:expire_lots(now_s)
  local x, n = m:next_expiry()
  table.insert(out, {m.a, m.p, m.h, m.u, m.pe, m.lim, m.pt, m.ps, x, n})
end
return out
