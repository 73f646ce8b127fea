-- balance: every meter of one org as a decision would see it now (period refresh applied in
-- memory only; holds past their expiry left out, swept or not). ARGV: one group of
-- BALANCE_ARGV per meter. Returns per meter: a, p, h, u, pe, lim, pt, ps, next expiry
-- (unix s, 0 none), its amount.
local k = bind(KEYS, {'bal', 'reservations', 'expiries'})
local per_meter = {}
for i = 1, #ARGV, #BALANCE_ARGV do
  insert(per_meter, bind({unpack(ARGV, i, i + #BALANCE_ARGV - 1)}, BALANCE_ARGV))
end

local now_s = floor(now_us() / 1000000)
local expired = expired_holds(k.reservations, k.expiries, now_s)
local out = {}
for _, a in ipairs(per_meter) do
  local m = load_meter(k.bal, a.meter, expired)
  m:refresh(tonumber(a.allocation), a.period, a.rollover == '1', now_s)
  m:expire_lots(now_s)
  local x, n = m:next_expiry()
  insert(out, {m.a, m.p, m.h, m.u, m.pe, m.lim, m.pt, m.ps, x, n})
end
return out
