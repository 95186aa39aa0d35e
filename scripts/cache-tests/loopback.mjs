// Preloaded (`node --import ./loopback.mjs …`) into the suite's origin server, whose
// server/server.mjs calls `server.listen(port)` and so would bind every interface. This makes
// a listen with a port and no host bind 127.0.0.1 only; the suite's own files stay untouched.
import net from 'node:net'

const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (...args) {
  const first = args[0]
  const portOnly = (typeof first === 'number' || (typeof first === 'string' && /^\d+$/.test(first))) &&
    (args.length === 1 || typeof args[1] === 'function')
  if (portOnly) args.splice(1, 0, '127.0.0.1')
  return listen.apply(this, args)
}
