// Evaluated in every context before the payload formatter. It adds the
// global `console` and changes some Array.prototype methods; it leaves no
// other global names behind.
//
// Why the Array methods change: QuickJS checks the time limit only while it
// runs JavaScript, and some of its built-in Array methods visit every index
// up to `length` in C without checking. On an empty array whose length is set
// to 2^32 - 1, `reverse()` alone runs for minutes (QuickJS-ng 0.16 on a
// 2-core x86-64 machine: about 25 ns per index for `reverse`, up to 50 ns
// for `shift` and `copyWithin`).
// - `flat` and `flatMap` are replaced by versions written in JavaScript,
//   which the time limit interrupts.
// - The other methods measured as unchecked first count the elements they
//   would visit and throw a RangeError above MAX_ELEMENTS. Array methods not
//   listed here either check the time limit or allocate memory for each
//   index, so the time or memory limit stops them.
// - JSON.stringify without a replacer function gets one that returns each
//   value unchanged. Calling it for every value lets the time limit stop
//   the serialization of a huge sparse array, which otherwise runs until
//   the memory limit (about 0.2 s for the default 16 MiB).
(function (global) {
  'use strict';

  // 2^16 indices take at most about 3 ms in the slowest method above.
  var MAX_ELEMENTS = 65536;
  var MAX_SAFE_INTEGER = 9007199254740991;

  // Taken before the formatter runs, so that it cannot replace them.
  var ArrayPrototype = Array.prototype;
  var ObjectConstructor = Object;
  var apply = Reflect.apply;
  var defineProperty = Object.defineProperty;
  var getOwnPropertyDescriptor = Object.getOwnPropertyDescriptor;
  var getPrototypeOf = Object.getPrototypeOf;
  var isArray = Array.isArray;
  var toNumber = Number;
  var floor = Math.floor;
  var min = Math.min;
  var JSONObject = JSON;
  var stringify = JSON.stringify;
  var typedArrayLength =
    getOwnPropertyDescriptor(getPrototypeOf(Uint8Array.prototype), 'length').get;

  function discard() {}

  global.console = {
    log: discard,
    info: discard,
    warn: discard,
    error: discard,
    debug: discard,
    trace: discard
  };

  function toLength(value) {
    var number = toNumber(value);
    if (!(number > 0)) {
      return 0;
    }
    return floor(min(number, MAX_SAFE_INTEGER));
  }

  // Returns the `length` that a built-in method will read from `object`,
  // without running any of the formatter's code, so that the value cannot
  // change between this check and the method's own read. A length from a
  // getter (other than the one of typed arrays) or from an object's valueOf
  // could, so it is rejected.
  function stableLength(object, method) {
    if (object === null || object === undefined) {
      return 0;
    }
    var target = ObjectConstructor(object);
    for (var holder = target; holder !== null; holder = getPrototypeOf(holder)) {
      var descriptor = getOwnPropertyDescriptor(holder, 'length');
      if (descriptor === undefined) {
        continue;
      }
      if (descriptor.get === typedArrayLength) {
        return apply(typedArrayLength, target, []);
      }
      var value = descriptor.value;
      if (!('value' in descriptor) || typeof value === 'object' || typeof value === 'function') {
        throw new RangeError('Array.prototype.' + method + ' was called on an object whose ' +
          'length is a getter or an object; the sandbox accepts only arrays and objects ' +
          'with a numeric length');
      }
      return toLength(value);
    }
    return 0;
  }

  function guard(name, countElements) {
    var original = ArrayPrototype[name];
    var guarded = function () {
      var count = countElements(this, arguments, name);
      if (count > MAX_ELEMENTS) {
        throw new RangeError('Array.prototype.' + name + ' was called on ' + count +
          ' elements; the sandbox allows at most ' + MAX_ELEMENTS);
      }
      return apply(original, this, arguments);
    };
    defineProperty(guarded, 'name', { value: name });
    defineProperty(guarded, 'length', { value: original.length });
    defineProperty(ArrayPrototype, name, { value: guarded });
  }

  var guardedMethods = ['copyWithin', 'join', 'reverse', 'shift', 'slice', 'sort',
    'splice', 'toLocaleString'];
  for (var i = 0; i < guardedMethods.length; i++) {
    guard(guardedMethods[i], function (object, args, name) {
      return stableLength(object, name);
    });
  }

  guard('unshift', function (object, args, name) {
    return stableLength(object, name) + args.length;
  });

  // Counts every object argument by its length, even one that is not
  // spread, because a getter for Symbol.isConcatSpreadable could return a
  // different value when the built-in method reads it.
  guard('concat', function (object, args, name) {
    var count = stableLength(object, name);
    for (var index = 0; index < args.length; index++) {
      var argument = args[index];
      if (argument !== null && typeof argument === 'object') {
        count += stableLength(argument, name);
      } else {
        count += 1;
      }
    }
    return count;
  });

  function toObject(value, method) {
    if (value === null || value === undefined) {
      throw new TypeError('Array.prototype.' + method + ' called on null or undefined');
    }
    return ObjectConstructor(value);
  }

  function append(target, count, value) {
    defineProperty(target, count, {
      value: value,
      writable: true,
      enumerable: true,
      configurable: true
    });
    return count + 1;
  }

  // Appends the elements of `source` to `target`, descending `depth` levels
  // into nested arrays, and returns the new element count. Holes are
  // skipped, as the built-in methods do.
  function flattenInto(target, count, source, depth) {
    var length = toLength(source.length);
    for (var index = 0; index < length; index++) {
      if (!(index in source)) {
        continue;
      }
      var element = source[index];
      if (depth > 0 && isArray(element)) {
        count = flattenInto(target, count, element, depth - 1);
      } else {
        count = append(target, count, element);
      }
    }
    return count;
  }

  function toDepth(value) {
    if (value === undefined) {
      return 1;
    }
    var number = toNumber(value);
    if (number !== number) {
      return 0;
    }
    return number === Infinity ? Infinity : floor(number);
  }

  var flat = function () {
    var source = toObject(this, 'flat');
    var target = [];
    flattenInto(target, 0, source, toDepth(arguments[0]));
    return target;
  };
  defineProperty(flat, 'name', { value: 'flat' });
  defineProperty(flat, 'length', { value: 0 });
  defineProperty(ArrayPrototype, 'flat', { value: flat });

  var flatMap = function (callback) {
    var source = toObject(this, 'flatMap');
    if (typeof callback !== 'function') {
      throw new TypeError('Array.prototype.flatMap: the callback is not a function');
    }
    var thisArg = arguments[1];
    var target = [];
    var count = 0;
    var length = toLength(source.length);
    for (var index = 0; index < length; index++) {
      if (!(index in source)) {
        continue;
      }
      var mapped = apply(callback, thisArg, [source[index], index, source]);
      if (isArray(mapped)) {
        count = flattenInto(target, count, mapped, 0);
      } else {
        count = append(target, count, mapped);
      }
    }
    return target;
  };
  defineProperty(flatMap, 'name', { value: 'flatMap' });
  defineProperty(ArrayPrototype, 'flatMap', { value: flatMap });

  function keepValue(key, value) {
    return value;
  }

  var guardedStringify = function (value, replacer, space) {
    if (typeof replacer !== 'function' && !isArray(replacer)) {
      replacer = keepValue;
    }
    return apply(stringify, JSONObject, [value, replacer, space]);
  };
  defineProperty(guardedStringify, 'name', { value: 'stringify' });
  defineProperty(JSONObject, 'stringify', { value: guardedStringify });
})(globalThis);
