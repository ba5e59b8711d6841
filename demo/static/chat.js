// The chat page. Plain JavaScript (an ES module), no build step, no dependencies.
//
// The stream is a SharedEventSource (tornado_sse's /sse/client.js): the tabs of this browser in
// one room under one nickname share one connection (they use the same client id, kept in
// localStorage per nickname), which a plain EventSource per tab would not: past 6 tabs, HTTP/1.1
// would leave the 7th hanging.
//
// Rules this file keeps:
// * user text is only ever put in the page with textContent (never innerHTML);
// * the page does no de-duplication of its own: EventSource resumes with Last-Event-ID and the
//   server sends each missed event exactly once; each message keeps its event id (data-id) and
//   the number of the connection that delivered it (data-conn) so that this can be checked;
// * the member list is the server's snapshot (who was announced in the room, joined and not
//   left, when the page asked, before its stream opened), then every join and leave of the
//   stream applied in order, the replayed ones included: what changed in between is in the
//   replay, and an older event applied again changes nothing (see demo/chat.py).
import { SharedEventSource } from '/sse/client.js';

(() => {
  const $ = (id) => document.getElementById(id);
  const xsrf = document.querySelector('meta[name="xsrf-token"]').content;
  const maxMessage = Number(document.querySelector('meta[name="max-message"]').content) || 500;
  const NICK_KEY = 'tornado-sse-demo-nick';
  const CLIENT_KEY = 'tornado-sse-demo-client:';

  let session = null; // {room, nick, client, es, opens, members}

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(state, text) {
    $('status').dataset.state = state;
    $('status-text').textContent = text;
  }

  function hue(name) {
    let h = 0;
    for (const ch of name) h = (h * 31 + ch.codePointAt(0)) % 360;
    return String(h);
  }

  function clock(ts) {
    const date = typeof ts === 'number' ? new Date(ts * 1000) : new Date();
    return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  }

  async function api(method, url, params, keepalive) {
    const init = { method, headers: { 'X-XSRFToken': xsrf }, credentials: 'same-origin' };
    if (keepalive) init.keepalive = true;
    if (params) init.body = new URLSearchParams(params);
    let response;
    try {
      response = await fetch(url, init);
    } catch (err) {
      return { ok: false, error: 'The server cannot be reached.' };
    }
    let body = {};
    try {
      body = await response.json();
    } catch (err) {
      body = {};
    }
    if (!response.ok) {
      return { ok: false, status: response.status, error: body.error || `HTTP ${response.status}` };
    }
    return { ok: true, body };
  }

  // ------------------------------------------------------------------ the log

  function append(node) {
    const log = $('log');
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.append(node);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  function addMessage(msg, id) {
    const item = el('li', 'msg');
    item.dataset.id = id;
    item.dataset.conn = String(session.opens);
    if (msg.nick === session.nick) item.classList.add('mine');
    const nick = el('span', 'nick', msg.nick);
    nick.style.setProperty('--hue', hue(String(msg.nick)));
    item.append(el('time', 'time', clock(msg.ts)), nick, el('span', 'text', msg.text));
    append(item);
  }

  function addNotice(text, id, kind) {
    const item = el('li', `notice ${kind || ''}`.trim(), text);
    if (id) item.dataset.id = id;
    item.dataset.conn = String(session.opens);
    append(item);
  }

  function renderMembers() {
    const order = (a, b) => (a < b ? -1 : a > b ? 1 : 0);
    const members = [...session.members].sort(
      (a, b) => order(a.toLowerCase(), b.toLowerCase()) || order(a, b),
    );
    const list = $('members');
    list.replaceChildren(
      ...members.map((name) => {
        const item = el('li', name === session.nick ? 'me' : '', name);
        item.style.setProperty('--hue', hue(name));
        return item;
      }),
    );
    $('member-count').textContent = String(members.length);
  }

  // ------------------------------------------------------------------ entering and leaving

  function listen(url) {
    const es = new SharedEventSource(url);
    session.es = es;
    // events of a stream we are leaving are not ours any more
    const on = (type, handler) => {
      es.addEventListener(type, (e) => {
        if (session && session.es === es) handler(e);
      });
    };
    on('open', () => {
      session.opens += 1;
      if (session.opens === 1) setStatus('connected', 'connected');
      else setStatus('resumed', 'resumed: missed messages delivered');
    });
    on('error', () => {
      if (es.readyState === SharedEventSource.CLOSED) {
        setStatus('offline', 'disconnected: reload the page to retry');
      } else {
        setStatus('reconnecting', 'reconnecting…');
      }
    });
    on('message', (e) => addMessage(JSON.parse(e.data), e.lastEventId));
    // the core's presence events: {"channel": "room/<name>", "user": <nickname>}
    on('join', (e) => {
      const { user } = JSON.parse(e.data);
      addNotice(`${user} joined`, e.lastEventId, 'join');
      session.members.add(user);
      renderMembers();
    });
    on('leave', (e) => {
      const { user } = JSON.parse(e.data);
      addNotice(`${user} left`, e.lastEventId, 'leave');
      session.members.delete(user);
      renderMembers();
    });
    on('stream-reset', (e) => {
      addNotice('Some earlier messages are no longer available.', e.lastEventId, 'warning');
      refreshMembers(); // joins and leaves may be among what was lost
    });
    on('shutdown', () => {
      addNotice('The server is restarting; reconnecting…', '', 'warning');
    });
  }

  async function refreshMembers() {
    const current = session;
    const query = new URLSearchParams({ nick: current.nick, client: current.client });
    const result = await api('GET', `/api/rooms/${encodeURIComponent(current.room)}?${query}`);
    if (result.ok && session === current) {
      current.members = new Set(result.body.members);
      renderMembers();
    }
  }

  function enter(info) {
    leave(false);
    session = {
      room: info.room,
      nick: info.nick,
      client: info.client,
      es: null,
      opens: 0,
      members: new Set(info.members),
    };
    $('lobby').hidden = true;
    $('chat').hidden = false;
    $('room-title').textContent = `#${info.room}`;
    $('me').textContent = info.nick;
    $('log').replaceChildren();
    $('send-error').textContent = '';
    renderMembers();
    updateCounter();
    window.history.replaceState(null, '', `?room=${encodeURIComponent(info.room)}`);
    document.title = `#${info.room} · tornado_sse chat`;
    setStatus('connecting', 'connecting…');
    listen(info.events);
    $('text').focus();
  }

  // Leave the room. The server closes our stream as a leave, so the others see us leave now (a
  // connection that is merely lost keeps us present for a grace period instead); with `wait`,
  // our own stream is closed once it did, else at once (the tab is closing: the request
  // outlives the page, but the lost connection may reach the server first). While another tab
  // of ours shares the stream, we are still in the room, and say nothing.
  async function leave(wait) {
    const current = session;
    session = null;
    $('chat').hidden = true;
    $('lobby').hidden = false;
    setStatus('idle', 'not connected');
    if (current && current.es) {
      if (current.es.tabs <= 1) {
        const request = api('POST', `/api/rooms/${encodeURIComponent(current.room)}/leave`, {
          client: current.client,
        }, true);
        if (wait) await request;
      }
      current.es.close();
    }
  }

  $('join-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    const nick = $('nick').value.trim();
    const room = $('room').value.trim().toLowerCase();
    if (!room) {
      $('join-error').textContent = 'Choose a room.';
      return;
    }
    $('join').disabled = true;
    let client = '';
    try {
      client = window.localStorage.getItem(CLIENT_KEY + nick) || '';
    } catch (err) {
      client = '';
    }
    const query = new URLSearchParams({ nick });
    if (client) query.set('client', client);
    const result = await api('GET', `/api/rooms/${encodeURIComponent(room)}?${query}`);
    $('join').disabled = false;
    if (!result.ok) {
      $('join-error').textContent = result.error;
      return;
    }
    $('join-error').textContent = '';
    try {
      window.localStorage.setItem(NICK_KEY, result.body.nick);
      window.localStorage.setItem(CLIENT_KEY + result.body.nick, result.body.client);
    } catch (err) {
      // storage may be disabled; the nickname is then asked again next time
    }
    enter(result.body);
  });

  $('leave').addEventListener('click', () => {
    leave(true);
    $('nick').focus();
  });

  $('drop').addEventListener('click', async () => {
    if (!session) return;
    const result = await api('POST', `/api/rooms/${encodeURIComponent(session.room)}/drop`, {
      client: session.client,
    });
    if (!result.ok) $('send-error').textContent = result.error;
  });

  // ------------------------------------------------------------------ sending

  function updateCounter() {
    const length = [...$('text').value].length;
    const counter = $('counter');
    counter.textContent = `${length}/${maxMessage}`;
    counter.classList.toggle('over', length > maxMessage);
  }

  $('text').addEventListener('input', updateCounter);
  $('text').addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $('send-form').requestSubmit();
    }
  });

  $('send-form').addEventListener('submit', async (event) => {
    event.preventDefault();
    if (!session) return;
    const text = $('text').value;
    if (!text.trim()) return;
    $('send').disabled = true;
    const result = await api('POST', `/api/rooms/${encodeURIComponent(session.room)}/messages`, {
      nick: session.nick,
      text,
    });
    $('send').disabled = false;
    if (!result.ok) {
      $('send-error').textContent = result.error;
      return;
    }
    $('send-error').textContent = '';
    $('text').value = '';
    updateCounter();
    $('text').focus();
  });

  window.addEventListener('pagehide', () => {
    if (session) leave(false);
  });

  // ------------------------------------------------------------------ start

  try {
    $('nick').value = window.localStorage.getItem(NICK_KEY) || '';
  } catch (err) {
    $('nick').value = '';
  }
  (($('nick').value ? $('room') : $('nick'))).focus();
})();
