// SharedEventSource: one event stream per browser for all the tabs of an origin (issue 16).
//
// A drop-in for EventSource: `new SharedEventSource(url, {withCredentials, token})`, then
// onopen / onmessage / onerror, addEventListener for named events, readyState, lastEventId and
// close(). Plain ES module, no build step, no dependency.
//
// How it works. Every tab that opens a SharedEventSource for the same stream URL (without its
// `channel` arguments) joins a BroadcastChannel and queues for a Web Lock of that name. The tab
// holding the lock leads: it opens the one stream to the server, for the union of every tab's
// channels, with `?with_channel=1` so that each event carries a `channel:` field (an SSE field a
// plain EventSource ignores), and broadcasts every event; each tab dispatches only the events of
// its own channels. The leader reads the stream with fetch() rather than EventSource because it
// must see what EventSource hides: the id-only event that primes a fresh stream, and the
// `channel:` field.
//
// Handover. Every tab knows the stream's position (the last id the leader broadcast, priming ids
// included) and remembers the ids of the last few thousand events it received. When the leading
// tab closes or crashes the browser releases its lock, the next tab in the queue leads and
// resumes from the last id it knows: events the old leader read but never broadcast are
// replayed, and an event a tab already has (the new leader may lag behind another tab by a few
// messages) is dropped by that tab's id memory. Nothing is lost, nothing is delivered twice.
// A stream over several shards of a sharded broker (ids like `2~<id>.0~<id>`) names an event
// by the first part of its id: the other parts are the stream's positions on the other shards,
// which may differ between the old leader's stream and the new one's.
//
// When a tab joins with a channel the stream does not follow yet, or the last tab of a channel
// leaves, the leader reconnects with its last id: nothing is lost there either.
//
// Where Web Locks or BroadcastChannel are missing, each tab falls back to a plain EventSource.
//
// Tokens. With `token: async () => "..."` the leader sends `Authorization: Bearer <token>` to its
// own origin, and `?access_token=` to another (a header would need a CORS preflight) and in the
// fallback (EventSource cannot set headers). When the server ends a
// stream with an event named `token-expired`, a fresh token is fetched at once and the stream
// resumes from its last id.

const CONNECTING = 0;
const OPEN = 1;
const CLOSED = 2;
const REMEMBERED_IDS = 4096;
const RECONNECT_SETTLE_MS = 20;
// how long a new leader waits for the other tabs to answer before it forgets the silent ones
const ROLL_CALL_MS = 1000;

function shareable() {
  return (
    typeof BroadcastChannel === 'function' &&
    typeof navigator !== 'undefined' &&
    navigator.locks != null &&
    typeof navigator.locks.request === 'function'
  );
}

// What names an event: its id, or the first part of a composite id (`2~<id>.0~<id>`: the
// event's own shard and id; the other parts are the stream's positions, see the top).
function eventKey(id) {
  return id.includes('~') ? id.split('.', 1)[0] : id;
}

function newTabId() {
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

// An incremental parser of text/event-stream (WHATWG HTML, "Interpreting an event stream").
class StreamParser {
  constructor(onEvent, onRetry) {
    this.onEvent = onEvent;
    this.onRetry = onRetry;
    this.buffer = '';
    this.first = true;
    this.reset();
  }

  reset() {
    this.data = [];
    this.type = '';
    this.id = null;
    this.channel = null;
  }

  feed(text) {
    if (this.first && text) {
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      this.first = false;
    }
    this.buffer += text;
    // a CR at the very end may be the first half of a CRLF: keep it for the next chunk
    const end = this.buffer.endsWith('\r') ? this.buffer.length - 1 : this.buffer.length;
    const lines = this.buffer.slice(0, end).split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + this.buffer.slice(end);
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === '') {
      this.dispatch();
      return;
    }
    if (line[0] === ':') return;
    const colon = line.indexOf(':');
    let field = line;
    let value = '';
    if (colon >= 0) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value[0] === ' ') value = value.slice(1);
    }
    if (field === 'data') this.data.push(value);
    else if (field === 'event') this.type = value;
    else if (field === 'id') {
      if (!value.includes('\0')) this.id = value;
    } else if (field === 'retry') {
      if (/^\d+$/.test(value)) this.onRetry(Number(value));
    } else if (field === 'channel') this.channel = value;
  }

  dispatch() {
    const event = {
      id: this.id,
      type: this.type || 'message',
      data: this.data.length ? this.data.join('\n') : null,
      channel: this.channel,
    };
    this.reset();
    if (event.id !== null || event.data !== null) this.onEvent(event);
  }
}

export class SharedEventSource extends EventTarget {
  static CONNECTING = CONNECTING;
  static OPEN = OPEN;
  static CLOSED = CLOSED;

  constructor(url, init = {}) {
    super();
    const full = new URL(String(url), globalThis.location ? globalThis.location.href : undefined);
    this.url = full.href;
    this.withCredentials = Boolean(init.withCredentials);
    this.readyState = CONNECTING;
    this.lastEventId = '';
    this.onopen = null;
    this.onmessage = null;
    this.onerror = null;
    for (const type of ['open', 'message', 'error']) {
      super.addEventListener(type, (event) => {
        const handler = this[`on${type}`];
        if (typeof handler === 'function') handler.call(this, event);
      });
    }
    this._token = typeof init.token === 'function' ? init.token : null;
    this._channels = full.searchParams.getAll('channel');
    this._resumeFrom = full.searchParams.get('last_event_id');
    // ?history=N (the last N events of the channels) is, like last_event_id, this tab's own
    this._history = this._resumeFrom === null ? full.searchParams.get('history') : null;
    const base = new URL(full.href);
    base.searchParams.delete('channel');
    base.searchParams.delete('last_event_id');
    base.searchParams.delete('history');
    base.searchParams.delete('with_channel');
    base.searchParams.delete('until');
    this._base = base;
    /** 'shared' or 'fallback': how this tab receives its events */
    this.mode = shareable() ? 'shared' : 'fallback';
    if (this.mode === 'fallback') {
      this._forwarded = new Set();
      this._openFallback();
    } else {
      this._openShared();
    }
  }

  /** How many tabs share this stream, this one included (1 in fallback mode). A tab that
   * crashed is counted until the roll call of the next leader. */
  get tabs() {
    return this.mode === 'shared' && this.readyState !== CLOSED ? this._tabs.size : 1;
  }

  /** Whether this tab holds the stream for all the others (always false in fallback mode). */
  get leading() {
    return Boolean(this._leading);
  }

  addEventListener(type, listener, options) {
    super.addEventListener(type, listener, options);
    if (this.mode === 'fallback') this._forward(type);
  }

  close() {
    if (this.readyState === CLOSED) return;
    this.readyState = CLOSED;
    if (this.mode === 'fallback') {
      if (this._source) this._source.close();
      return;
    }
    window.removeEventListener('pagehide', this._onPageHide);
    this._post({ t: 'bye', tab: this._tab });
    this._stopStream();
    clearTimeout(this._reconnectTimer);
    if (this._releaseLock) this._releaseLock();
    this._lockAbort.abort();
    this._bc.close();
  }

  // ---------------------------------------------------------------- shared by every mode

  _emit(type, init) {
    this.dispatchEvent(init === undefined ? new Event(type) : new MessageEvent(type, init));
  }

  _setState(state) {
    if (this.readyState === CLOSED) return;
    const before = this.readyState;
    this.readyState = state;
    if (state === OPEN && before !== OPEN) this._emit('open');
    else if (state !== OPEN) this._emit('error');
  }

  async _freshToken() {
    return this._token ? String(await this._token()) : null;
  }

  // ---------------------------------------------------------------- fallback: EventSource per tab

  async _openFallback() {
    const url = new URL(this.url);
    if (this.lastEventId) url.searchParams.set('last_event_id', this.lastEventId);
    let token = null;
    try {
      token = await this._freshToken();
    } catch (err) {
      this.readyState = CLOSED;
      this._emit('error');
      return;
    }
    if (this.readyState === CLOSED) return;
    if (token !== null) url.searchParams.set('access_token', token);
    const source = new EventSource(url.href, { withCredentials: this.withCredentials });
    this._source = source;
    source.onopen = () => {
      this._refused = false;
      this._setState(OPEN);
    };
    source.onerror = () => {
      if (this._source !== source || this.readyState === CLOSED) return;
      if (source.readyState === EventSource.CLOSED && this._token && !this._refused) {
        // refused (EventSource's own reconnect carries the old token, or a fresh token expired
        // on its way): one more try with a fresh token; a second refusal in a row is final
        this._refused = true;
        this._setState(CONNECTING);
        setTimeout(() => this._openFallback(), 0);
      } else if (source.readyState === EventSource.CLOSED) {
        this.readyState = CLOSED;
        this._emit('error');
      } else {
        this._setState(CONNECTING);
      }
    };
    source.addEventListener('token-expired', (event) => {
      if (this._source !== source) return;
      if (event.lastEventId) this.lastEventId = event.lastEventId;
      source.close();
      this._emit('token-expired', { data: event.data, lastEventId: this.lastEventId });
      this.readyState = CONNECTING;
      this._openFallback();
    });
    const forwarded = this._forwarded;
    this._forwarded = new Set();
    this._forward('message');
    for (const type of forwarded) this._forward(type);
  }

  _forward(type) {
    if (this._forwarded.has(type) || ['open', 'error', 'token-expired'].includes(type)) return;
    this._forwarded.add(type);
    const source = this._source;
    if (!source) return;
    source.addEventListener(type, (event) => {
      if (this._source !== source || this.readyState === CLOSED) return;
      this.lastEventId = event.lastEventId;
      this._emit(type, { data: event.data, lastEventId: event.lastEventId, origin: event.origin });
    });
  }

  // ---------------------------------------------------------------- shared: one stream, many tabs

  _openShared() {
    this._tab = newTabId();
    this._tabs = new Map([[this._tab, this._channels]]);
    this._seen = new Set();
    this._seenOrder = [];
    this._retry = 3000;
    this._streaming = null; // the channels of the leader's open stream, as last announced
    const key = `tornado-sse:${this.withCredentials ? 'cred' : 'anon'}:${this._base.href}`;
    this._bc = new BroadcastChannel(key);
    this._bc.onmessage = (event) => this._onBroadcast(event.data);
    this._onPageHide = () => this._post({ t: 'bye', tab: this._tab });
    window.addEventListener('pagehide', this._onPageHide);
    this._post({ t: 'hello', tab: this._tab, channels: this._channels });
    this._lockAbort = new AbortController();
    navigator.locks
      .request(key, { signal: this._lockAbort.signal }, () => this._lead())
      .catch(() => {});
  }

  _post(message) {
    try {
      this._bc.postMessage(message);
    } catch (err) {
      // closed channel: this tab is closing
    }
  }

  _onBroadcast(msg) {
    if (this.readyState === CLOSED || msg == null) return;
    switch (msg.t) {
      case 'hello':
        this._tabs.set(msg.tab, msg.channels);
        if (this._answered) this._answered.add(msg.tab);
      // falls through: a newcomer, or a new leader calling the roll, learns who is here
      case 'who':
        this._post({
          t: 'here',
          tab: this._tab,
          channels: this._channels,
          streaming: this._leading ? this._streaming : null,
          id: this.lastEventId,
        });
        if (this._leading && msg.t === 'hello') this._followChanged();
        break;
      case 'here':
        this._tabs.set(msg.tab, msg.channels);
        if (this._answered) this._answered.add(msg.tab);
        if (!this.lastEventId && msg.id) this.lastEventId = msg.id;
        if (msg.streaming) this._streamingNow(msg.streaming, msg.id);
        if (this._leading) this._followChanged();
        break;
      case 'bye':
        this._tabs.delete(msg.tab);
        if (this._leading) this._followChanged();
        break;
      case 'open':
        this._streamingNow(msg.channels, msg.from);
        break;
      case 'down':
        this._streaming = null;
        this._setState(msg.closed ? CLOSED : CONNECTING);
        break;
      case 'event':
        this._receive(msg);
        break;
      default:
        break;
    }
  }

  // The stream now follows *channels*; this tab receives every event after the id *from* ('':
  // after the id-only event that primes the fresh stream).
  _streamingNow(channels, from) {
    this._streaming = channels;
    if (!this._channels.every((channel) => channels.includes(channel))) return;
    const asked = this._resumeFrom !== null || this._history !== null;
    const first = this.readyState === CONNECTING && asked && !this._catchUp;
    this._setState(OPEN);
    if (!first) return;
    // the first time: what this tab's URL asked for (last_event_id or history) up to there,
    // on its own
    this._catchUp = { buffer: [], ids: new Set(), until: from || null };
    if (from) this._catchUpRead();
  }

  // A bounded read of this tab's channels from its URL's last_event_id (or its last `history`
  // events) up to where the shared stream took over (`?until=`), dispatched before the shared
  // events held back meanwhile.
  async _catchUpRead() {
    const catchUp = this._catchUp;
    const url = new URL(this._base.href);
    for (const channel of this._channels) url.searchParams.append('channel', channel);
    if (this._resumeFrom !== null) url.searchParams.set('last_event_id', this._resumeFrom);
    else url.searchParams.set('history', this._history);
    url.searchParams.set('until', catchUp.until);
    this._resumeFrom = null;
    this._history = null;
    const headers = { Accept: 'text/event-stream' };
    try {
      const token = await this._freshToken();
      if (token !== null && url.origin === location.origin) {
        headers.Authorization = `Bearer ${token}`;
      } else if (token !== null) {
        url.searchParams.set('access_token', token);
      }
      const response = await fetch(url.href, {
        headers,
        cache: 'no-store',
        credentials: this.withCredentials ? 'include' : 'same-origin',
      });
      if (response.status === 200) {
        const parser = new StreamParser(
          (event) => {
            if (event.data === null || this.readyState === CLOSED) return;
            if (event.id !== null) catchUp.ids.add(event.id);
            this._emit(event.type, {
              data: event.data,
              lastEventId: event.id || '',
              origin: this._base.origin,
            });
          },
          () => {},
        );
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.feed(decoder.decode(value, { stream: true }));
        }
      }
    } catch (err) {
      // the history is lost to this tab; the shared stream goes on
    }
    this._catchUp = null;
    for (const msg of catchUp.buffer) {
      if (msg.id === null || !catchUp.ids.has(msg.id)) this._dispatch(msg);
    }
  }

  _union() {
    const all = new Set();
    for (const channels of this._tabs.values()) for (const channel of channels) all.add(channel);
    return [...all].sort();
  }

  _remember(key) {
    this._seen.add(key);
    this._seenOrder.push(key);
    if (this._seenOrder.length > REMEMBERED_IDS) this._seen.delete(this._seenOrder.shift());
  }

  // An event of the shared stream, read here (leader) or broadcast by the leader (others).
  _receive(msg) {
    if (msg.id !== null) {
      if (msg.data !== null && msg.channel !== null) {
        const key = eventKey(msg.id);
        if (this._seen.has(key)) return;
        this._remember(key);
      }
      this.lastEventId = msg.id;
    }
    const catchUp = this._catchUp;
    if (msg.data === null) {
      // an id-only event: the stream's position (where a fresh stream starts)
      if (catchUp && catchUp.until === null && msg.id) {
        catchUp.until = msg.id;
        this._catchUpRead();
      }
      return;
    }
    if (!this._follows(msg.channel)) return;
    if (catchUp) catchUp.buffer.push({ ...msg, lastEventId: this.lastEventId });
    else this._dispatch({ ...msg, lastEventId: this.lastEventId });
  }

  // Whether this tab takes events of *channel* (null: an event of the stream itself). A URL
  // without channel arguments leaves the choice to the server: its tabs take every event.
  _follows(channel) {
    return channel === null || this._channels.length === 0 || this._channels.includes(channel);
  }

  _dispatch(msg) {
    if (this.readyState === CLOSED) return;
    this._emit(msg.type, { data: msg.data, lastEventId: msg.lastEventId, origin: this._base.origin });
  }

  // ---------------------------------------------------------------- the leading tab

  async _lead() {
    if (this.readyState === CLOSED) return;
    this._leading = true;
    const released = new Promise((resolve) => {
      this._releaseLock = resolve;
    });
    this._connect();
    // A tab that crashed said no goodbye: whoever does not answer the roll call is forgotten
    // (and its channels with it), once the stream is back.
    this._answered = new Set([this._tab]);
    this._post({ t: 'who' });
    const rollCall = setTimeout(() => {
      const answered = this._answered;
      this._answered = null;
      for (const tab of [...this._tabs.keys()]) if (!answered.has(tab)) this._tabs.delete(tab);
      if (this._leading) this._followChanged();
    }, ROLL_CALL_MS);
    await released;
    clearTimeout(rollCall);
    this._answered = null;
    this._leading = false;
  }

  _followChanged() {
    const union = this._union();
    if (this._following && union.join('\n') === this._following.join('\n')) return;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._connect(), RECONNECT_SETTLE_MS);
  }

  _stopStream() {
    if (this._abort) {
      this._abort.abort();
      this._abort = null;
    }
  }

  async _connect() {
    clearTimeout(this._reconnectTimer);
    this._stopStream();
    if (this.readyState === CLOSED || !this._leading) return;
    const abort = new AbortController();
    this._abort = abort;
    const union = this._union();
    this._following = union;
    const url = new URL(this._base.href);
    for (const channel of union) url.searchParams.append('channel', channel);
    url.searchParams.set('with_channel', '1');
    const from = this.lastEventId;
    if (from) url.searchParams.set('last_event_id', from);
    const headers = { Accept: 'text/event-stream' };
    let response;
    try {
      const token = await this._freshToken();
      if (abort.signal.aborted) return;
      if (token !== null && url.origin === location.origin) {
        headers.Authorization = `Bearer ${token}`;
      } else if (token !== null) {
        url.searchParams.set('access_token', token); // cross-origin: no preflight for a header
      }
      response = await fetch(url.href, {
        headers,
        cache: 'no-store',
        credentials: this.withCredentials ? 'include' : 'same-origin',
        signal: abort.signal,
      });
    } catch (err) {
      if (!abort.signal.aborted) this._lost(abort);
      return;
    }
    const type = response.headers.get('Content-Type') || '';
    if (response.status === 401 && this._token && !this._refused) {
      // a token may expire on its way: one more try with a fresh one
      abort.abort();
      this._refused = true;
      this._lost(abort);
      return;
    }
    if (response.status !== 200 || !/^text\/event-stream/i.test(type)) {
      // as EventSource: another status or content type ends the stream for good
      abort.abort();
      this._post({ t: 'down', closed: true });
      this.readyState = CLOSED;
      this._emit('error');
      return;
    }
    this._refused = false;
    this._streaming = union;
    this._post({ t: 'open', channels: union, from });
    this._streamingNow(union, from);
    let expired = false;
    const parser = new StreamParser(
      (event) => {
        if (abort.signal.aborted) return;
        if (event.type === 'token-expired' && event.channel === null) {
          expired = true;
          if (event.id !== null) this.lastEventId = event.id;
          abort.abort();
          return;
        }
        const msg = { t: 'event', ...event };
        this._post(msg);
        this._receive(msg);
      },
      (ms) => {
        this._retry = ms;
      },
    );
    const decoder = new TextDecoder();
    try {
      const reader = response.body.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done || abort.signal.aborted) break;
        parser.feed(decoder.decode(value, { stream: true }));
      }
    } catch (err) {
      // a network error, or our own abort
    }
    if (expired) {
      this._emit('token-expired', { data: '', lastEventId: this.lastEventId });
      if (this._abort === abort) this._connect();
      return;
    }
    this._lost(abort);
  }

  _lost(abort) {
    if (this._abort !== abort || this.readyState === CLOSED) return;
    this._abort = null;
    this._streaming = null;
    this._post({ t: 'down', closed: false });
    this._setState(CONNECTING);
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._connect(), this._retry);
  }
}

export default SharedEventSource;
